"""Metrics sinks: JSON lines, TensorBoard, logging, and the rank/step filter in MetricsLogger."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from distscale.sinks import JsonlSink, LoggingSink, MetricsLogger, MetricsSink, TensorBoardSink

NAN = float("nan")
INF = float("inf")

# Shaped like GradScaler.metrics() plus the loss; the sinks must not care which keys appear.
VALUES = {
    "scale": 65536.0,
    "growth_tracker": 3,
    "steps": 12,
    "skipped_steps": 2,
    "step_was_skipped": False,
    "grad_norm": NAN,
    "loss": 3.25,
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Recorder:
    """A minimal sink (no base class): satisfies the MetricsSink protocol structurally."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, dict]] = []
        self.closed = 0

    def write(self, step, values) -> None:
        self.writes.append((step, dict(values)))

    def close(self) -> None:
        self.closed += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- JsonlSink -------------------------------------------------------------------------------------


def test_jsonl_round_trip_step_first_and_non_finite_as_null(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.jsonl"  # parent created on first write
    with JsonlSink(path) as sink:
        assert isinstance(sink, MetricsSink)
        assert not path.exists(), "nothing is created before the first write"
        sink.write(0, VALUES)
        sink.write(1, {"loss": INF, "scale": -INF, "x": np.float32(0.5), "n": np.int64(7), "none": None})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    first, second = (json.loads(line, parse_constant=pytest.fail) for line in text.splitlines())
    assert next(iter(first)) == "step"
    assert first == {**{"step": 0}, **VALUES, "grad_norm": None}
    assert first["step_was_skipped"] is False and isinstance(first["growth_tracker"], int)
    assert second == {"step": 1, "loss": None, "scale": None, "x": 0.5, "n": 7, "none": None}


def test_jsonl_flushes_each_write(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.write(5, {"loss": 1.0})
    assert _lines(path) == [{"step": 5, "loss": 1.0}], "readable before close()"
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(6, {"loss": 1.0})


def test_jsonl_append_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 9.0}\n')
    with JsonlSink(path) as sink:  # append=True: a resumed run keeps the earlier lines
        sink.write(1, {"loss": 8.0})
    assert [r["step"] for r in _lines(path)] == [0, 1]
    with JsonlSink(path, append=False) as sink:
        sink.write(2, {"loss": 7.0})
    assert _lines(path) == [{"step": 2, "loss": 7.0}]


def test_jsonl_accepts_matching_step_key(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with JsonlSink(path) as sink:
        sink.write(3, {"step": 3, "loss": 1.0})  # launch/train.py's records carry their step
        with pytest.raises(ValueError, match=r"values\['step'\] must equal the step argument \(4\)"):
            sink.write(4, {"step": 3})
    assert _lines(path) == [{"step": 3, "loss": 1.0}]


# --- TensorBoardSink ---------------------------------------------------------------------------------


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    import tensorboard  # noqa: F401  (dev extra; a missing package fails here, not skips)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    with TensorBoardSink(log_dir) as sink:
        assert not log_dir.exists(), "the event file is created on the first write"
        for step in range(3):
            sink.write(step, {"scale": 2.0**step, "step_was_skipped": step == 1, "grad_norm": None})
    custom = tmp_path / "tb2"
    with TensorBoardSink(custom, prefix="amp/") as sink:
        sink.write(7, {"loss": 0.5})

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["scaler/scale", "scaler/step_was_skipped"], "None is skipped"
    assert [(e.step, e.value) for e in acc.Scalars("scaler/scale")] == [(0, 1.0), (1, 2.0), (2, 4.0)]
    assert [e.value for e in acc.Scalars("scaler/step_was_skipped")] == [0.0, 1.0, 0.0]
    acc = EventAccumulator(str(custom))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("amp/loss")] == [(7, 0.5)]


# --- LoggingSink -----------------------------------------------------------------------------------


def test_logging_sink_one_compact_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distscale")
    with LoggingSink() as sink:
        sink.write(12, VALUES)
    (record,) = [r for r in caplog.records if r.name == "distscale"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "step 12: scale=6.554e+04 growth_tracker=3 steps=12 skipped_steps=2 "
        "step_was_skipped=False grad_norm=nan loss=3.25"
    )


def test_logging_sink_custom_logger_and_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="train")
    LoggingSink("train", level="debug").write(1, {"loss": 2.0})
    LoggingSink(logging.getLogger("train"), level=logging.WARNING).write(2, {"loss": 1.0})
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "train"] == [
        (logging.DEBUG, "step 1: loss=2"),
        (logging.WARNING, "step 2: loss=1"),
    ]


# --- MetricsLogger ---------------------------------------------------------------------------------


def test_logger_every_n_steps_to_all_sinks() -> None:
    a, b = Recorder(), Recorder()
    with MetricsLogger([a, b], every=3) as logger:
        written = [logger.log(step, {"loss": float(step)}) for step in range(8)]
        assert [logger.should_log(s) for s in range(4)] == [True, False, False, True]
        assert [logger.is_log_step(s) for s in range(4)] == [True, False, False, True]
    assert written == [s % 3 == 0 for s in range(8)]
    assert a.writes == b.writes == [(0, {"loss": 0.0}), (3, {"loss": 3.0}), (6, {"loss": 6.0})]
    assert a.closed == b.closed == 1


def test_logger_single_sink_and_single_process_rank() -> None:
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    sink = Recorder()
    logger = MetricsLogger(sink)  # one sink needs no list; one process is rank 0 of 1
    assert logger.sinks == [sink] and logger.is_logging_rank()
    logger.log(0, {"x": 1})
    assert sink.writes == [(0, {"x": 1})]
    with pytest.raises(ValueError, match=r"rank must be < the world size \(1\), got 1"):
        MetricsLogger(sink, rank=1).should_log(0)


def test_logger_only_the_logging_rank_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated 4-rank world: rank 2 is the logging rank, so ranks 0, 1, 3 never write."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    writes = {}
    for me in range(4):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, me=me: me)
        sink = Recorder()
        logger = MetricsLogger([sink], every=2, rank=2)
        assert all(logger.is_log_step(s) == (s % 2 == 0) for s in range(4)), "rank-free"
        for step in range(4):
            logger.log(step, {"loss": 1.0})
        writes[me] = [step for step, _ in sink.writes]
        default = MetricsLogger([Recorder()])
        assert default.should_log(0) == (me == 0), "default: rank 0 logs"
    assert writes == {0: [], 1: [], 2: [0, 2], 3: []}


def test_logger_close_closes_all_and_reraises_first_error() -> None:
    class Broken(Recorder):
        def close(self) -> None:
            super().close()
            raise OSError("disk gone")

    a, broken, c = Recorder(), Broken(), Recorder()
    with pytest.raises(OSError, match="disk gone"):
        MetricsLogger([a, broken, c]).close()
    assert a.closed == broken.closed == c.closed == 1


# --- argument errors: name, constraint, value ------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "fragments"),
    [
        (lambda: MetricsLogger([Recorder()], every=0), ValueError, ["every", ">= 1", "0"]),
        (lambda: MetricsLogger([Recorder()], every=2.0), TypeError, ["every", "int", "2.0"]),
        (lambda: MetricsLogger([Recorder()], every=True), TypeError, ["every", "int", "True"]),
        (lambda: MetricsLogger([Recorder()], rank=-1), ValueError, ["rank", ">= 0", "-1"]),
        (lambda: MetricsLogger([Recorder()], rank="0"), TypeError, ["rank", "int or None", "'0'"]),
        (lambda: MetricsLogger([object()]), TypeError, ["sinks[0]", "write(step, values)", "object"]),
        (lambda: MetricsLogger("m.jsonl"), TypeError, ["sinks", "iterable of sinks", "str"]),
        (lambda: JsonlSink(3), TypeError, ["path", "os.PathLike", "3"]),
        (lambda: JsonlSink("m.jsonl", append="yes"), TypeError, ["append", "bool", "'yes'"]),
        (lambda: TensorBoardSink(None), TypeError, ["log_dir", "os.PathLike", "None"]),
        (lambda: TensorBoardSink("tb", prefix=1), TypeError, ["prefix", "str", "1"]),
        (lambda: TensorBoardSink("tb", flush_secs=0), ValueError, ["flush_secs", "> 0", "0"]),
        (lambda: LoggingSink(level="LOUD"), ValueError, ["level", "logging.INFO", "'LOUD'"]),
        (lambda: LoggingSink(logger=5), TypeError, ["logger", "logging.Logger", "5"]),
    ],
)
def test_bad_constructor_arguments(make, exc, fragments) -> None:
    with pytest.raises(exc) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(
    ("step", "values", "exc", "fragments"),
    [
        (-1, {}, ValueError, ["step", ">= 0", "-1"]),
        (1.0, {}, TypeError, ["step", "int", "1.0"]),
        (True, {}, TypeError, ["step", "int", "True"]),
        (0, [("loss", 1.0)], TypeError, ["values", "mapping", "list"]),
        (0, {1: 1.0}, TypeError, ["keys", "str", "1"]),
        (0, {"loss": "3.2"}, TypeError, ["values['loss']", "float, int, bool or None", "str"]),
        (0, {"loss": torch.tensor(1.0)}, TypeError, ["values['loss']", "Tensor", ".item()"]),
    ],
)
def test_bad_write_arguments(tmp_path: Path, step, values, exc, fragments) -> None:
    path = tmp_path / "m.jsonl"
    for sink in (JsonlSink(path), LoggingSink()):
        with pytest.raises(exc) as info:
            sink.write(step, values)
        for fragment in fragments:
            assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
        sink.close()
    assert not path.exists(), "a rejected write leaves no file behind"


# --- the documented pattern, end to end --------------------------------------------------------------


def test_should_log_pattern_with_a_real_scaler(tmp_path: Path) -> None:
    """``if logger.should_log(step): logger.log(step, {**scaler.metrics(), ...})`` → JSONL → read_metrics."""
    from distscale import GradScaler
    from distscale.plot import read_metrics, skipped_flag

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    path = tmp_path / "m.jsonl"
    with MetricsLogger([JsonlSink(path)], every=2) as logger:
        for step in range(6):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if step == 2:
                loss = loss * float("inf")  # an overflow: this step is skipped and the scale backs off
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if logger.should_log(step):
                logger.log(step, {**scaler.metrics(), "loss": loss.item()})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [skipped_flag(r) for r in records] == [False, True, False]
    assert records[1]["scale"] == records[0]["scale"] / 2
    assert records[1]["loss"] is None and records[0]["grad_norm"] is None, "non-finite → null"
