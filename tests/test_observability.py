"""What the scaler shows: device-side metrics, the skipped-step signal, overflow diagnostics and
the underflow monitor (one process here; real gloo ranks at the end)."""

from __future__ import annotations

import logging
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import distscale
from distscale import diagnostics, stats
from distscale.checkpoint import FORMAT_VERSION
from distscale.skip import SkipAwareScheduler, ema_update_
from distscale.testing import count_host_syncs, run_ranks
from tests import dist_cases as dc

INF, NAN = float("inf"), float("nan")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _backward(model: nn.Module, scaler: distscale.GradScaler, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(4, 8, generator=gen)
    scaler.scale(model(x).pow(2).mean()).backward()


def _plant(model: nn.Module, value: float) -> None:
    next(model.parameters()).grad.view(-1)[3] = value


def _run(scaler, model, opt, plants: dict[int, float], steps: int, clip: float | None = None):
    """Train ``steps`` steps; return the metrics after each update."""
    out = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _backward(model, scaler, step)
        if step in plants:
            _plant(model, plants[step])
        if clip is not None:
            scaler.clip_grad_norm_(opt, clip)
        scaler.step(opt)
        scaler.update()
        out.append(scaler.metrics())
    return out


# ---------------------------------------------------------------------------- metrics


def _expected_counters(skipped: list[bool]) -> list[dict[str, int]]:
    """The counters' definitions, written out on the host."""
    rows, consecutive, longest, since = [], 0, 0, 0
    for s in skipped:
        consecutive = consecutive + 1 if s else 0
        longest = max(longest, consecutive)
        since = 0 if s else since + 1
        rows.append(
            {
                "consecutive_overflows": consecutive,
                "max_consecutive_overflows": longest,
                "steps_since_overflow": since,
                "step_was_skipped": s,
            }
        )
    return rows


def test_metrics_follow_their_definitions_step_by_step() -> None:
    plants = {1: INF, 2: NAN, 3: -INF, 6: INF, 9: NAN}
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    got = _run(scaler, model, opt, plants, 11)
    expected = _expected_counters([s in plants for s in range(11)])
    for step, (m, e) in enumerate(zip(got, expected, strict=True)):
        assert {k: m[k] for k in e} == e, f"step {step}: {m}"
        assert m["steps"] == step + 1
        assert m["skipped_steps"] == m["overflows"] == sum(1 for s in plants if s <= step)
        assert math.isnan(m["grad_norm"]), "no clipping: the norm is not measured"
        assert math.isnan(m["zero_fraction"]) and math.isnan(m["underflow_fraction"])
        previous = got[step - 1]["scale"] if step else 2.0**12
        if step in plants:
            assert m["scale"] == previous / 2
    assert got[-1]["scale"] == scaler.get_scale()
    assert got[-1]["max_consecutive_overflows"] == 3


def test_overflows_count_each_optimizer_and_grad_norm_is_the_clip_norm() -> None:
    model = _model()
    params = list(model.parameters())
    opt_a = torch.optim.SGD(params[:2], lr=0.01)
    opt_b = torch.optim.SGD(params[2:], lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    norms = []
    for step in range(4):
        for opt in (opt_a, opt_b):
            opt.zero_grad(set_to_none=True)
        _backward(model, scaler, step)
        if step == 1:
            params[0].grad.view(-1)[0] = INF  # opt_a only
        if step == 2:
            params[0].grad.view(-1)[0] = INF
            params[2].grad.view(-1)[0] = NAN  # both optimizers
        norms.append(scaler.clip_grad_norm_(opt_a, 1.0).item())
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        m = scaler.metrics()
        assert m["overflows"] == [0, 1, 3, 3][step], (step, m)
        assert m["skipped_steps"] == [0, 1, 2, 2][step]
        if math.isfinite(norms[-1]):
            assert m["grad_norm"] == pytest.approx(norms[-1], rel=0, abs=0)
        else:
            assert not math.isfinite(m["grad_norm"])


def test_steps_at_min_scale() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=4.0, min_scale=1.0, growth_interval=100)
    got = _run(scaler, model, opt, {0: INF, 1: INF, 2: INF, 3: INF}, 5)
    # 4 -> 2 -> 1 (at the floor) -> 1 -> 1 (clamped) -> clean step, still at 1.
    assert [m["scale"] for m in got] == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert [m["steps_at_min_scale"] for m in got] == [0, 1, 2, 3, 4]


def test_metrics_cost_one_host_read_and_the_step_none() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        opt.zero_grad()
        _backward(model, scaler, step)
        with count_host_syncs() as reads:
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
            tensors = scaler.metric_tensors()
            skipped = scaler.step_was_skipped
        assert sum(reads.values()) == 0, reads
        assert set(tensors) == set(scaler.metrics())
        assert skipped.dtype is torch.bool and skipped.shape == ()
        with count_host_syncs() as reads:
            scaler.metrics()
        assert sum(reads.values()) == 1, reads


def test_metric_tensors_are_copies() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu")
    _run(scaler, model, opt, {}, 1)
    before = scaler.metric_tensors()
    _run(scaler, model, opt, {0: INF}, 1)
    assert before["skipped_steps"].item() == 0 and scaler.metrics()["skipped_steps"] == 1


def test_disabled_scaler_has_no_metrics() -> None:
    scaler = distscale.GradScaler("cpu", enabled=False)
    assert scaler.metrics() == {} and scaler.metric_tensors() == {}
    assert scaler.last_step_skipped() is False


def test_last_step_skipped_reads_nothing_when_step_already_did() -> None:
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu")
    for plants, expected in (({}, False), ({0: INF}, True)):
        _run(scaler, model, sgd, plants, 1)
        with count_host_syncs() as reads:
            assert scaler.last_step_skipped() is expected
        assert sum(reads.values()) == 0, "SGD's step already read the flag"
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _run(scaler, model, fused, {0: NAN}, 1)
    with count_host_syncs() as reads:
        assert scaler.last_step_skipped() is True
        assert scaler.last_step_skipped() is True  # cached
    assert sum(reads.values()) == 1


# ---------------------------------------------------------------------------- state


def test_stats_are_checkpointed_and_resume_exactly() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12, underflow_every=2)
    _run(scaler, model, opt, {1: INF, 2: NAN}, 4, clip=1.0)
    state = scaler.state_dict()
    assert state["format_version"] == FORMAT_VERSION == 3
    assert set(state["stats"]) == set(stats.ScalerStats._fields)
    assert state["stats"]["grad_norm"] is not None and state == scaler.state_dict()
    restored = distscale.GradScaler("cpu")
    restored.load_state_dict(state)
    assert restored.metrics() == pytest.approx(scaler.metrics(), nan_ok=True)
    assert restored.last_step_skipped() is scaler.last_step_skipped()
    # torch.save(weights_only=True) takes it as is.
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.metrics() == pytest.approx(scaler.metrics(), nan_ok=True)
    assert clone._engine.underflow_every == 2


def test_version_2_state_loads_with_fresh_stats() -> None:
    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    del state["stats"]
    state["format_version"] = 2
    scaler.load_state_dict(state)
    m = scaler.metrics()
    assert m["overflows"] == 0 and math.isnan(m["grad_norm"])


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("grad_norm", -1.0, ValueError, "grad_norm"),
        ("grad_norm", "big", TypeError, "grad_norm"),
        ("zero_fraction", 1.5, ValueError, "zero_fraction"),
        ("overflows", -1, ValueError, "overflows"),
        ("overflows", 1.0, TypeError, "overflows"),
        ("step_was_skipped", 1, TypeError, "step_was_skipped"),
    ],
)
def test_bad_stats_are_refused_and_leave_the_scaler_unchanged(key, value, error, match) -> None:
    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    state["stats"][key] = value
    before = scaler.metrics()
    with pytest.raises(error, match=match):
        scaler.load_state_dict(state)
    assert scaler.metrics() == pytest.approx(before, nan_ok=True)


def test_missing_stats_key_is_named() -> None:
    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    del state["stats"]["overflows"]
    with pytest.raises(ValueError, match=r"missing \['overflows'\]"):
        scaler.load_state_dict(state)


# ---------------------------------------------------------------------------- skipped steps


def _lr_run(make_scheduler, plants: dict[int, float], steps: int, skip_aware: bool):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(opt)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    wrapped = SkipAwareScheduler(scheduler, scaler) if skip_aware else scheduler
    lrs = []
    for step in range(steps):
        opt.zero_grad()
        _backward(model, scaler, step)
        if step in plants:
            _plant(model, plants[step])
        lrs.append(opt.param_groups[0]["lr"])
        scaler.step(opt)
        scaler.update()
        wrapped.step()
    return lrs, wrapped


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_skip_aware_scheduler_follows_applied_updates(name: str) -> None:
    plants = {0: INF, 3: NAN, 4: INF, 8: INF}
    steps = 12
    with warnings.catch_warnings():
        # A skipped first step must not trigger torch's "scheduler before optimizer" warning.
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        lrs, wrapped = _lr_run(SCHEDULERS[name], plants, steps, skip_aware=True)
    clean, _ = _lr_run(SCHEDULERS[name], {}, steps - len(plants), skip_aware=False)
    # The LR of each applied update is the LR the clean run used for its n-th update.
    applied = [lr for step, lr in enumerate(lrs) if step not in plants]
    assert applied == clean
    assert wrapped.last_epoch == steps - len(plants)
    assert wrapped.num_skipped == len(plants)
    assert wrapped.get_last_lr() == wrapped.scheduler.get_last_lr()
    assert wrapped.state_dict() == wrapped.scheduler.state_dict()


def test_plain_scheduler_drifts_so_the_check_above_can_fail() -> None:
    plants = {0: INF, 3: NAN}
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step"):
        lrs, _ = _lr_run(SCHEDULERS["step"], plants, 8, skip_aware=False)
    clean, _ = _lr_run(SCHEDULERS["step"], {}, 6, skip_aware=False)
    assert [lr for step, lr in enumerate(lrs) if step not in plants] != clean


def test_skip_aware_scheduler_rejects_bad_arguments() -> None:
    scaler = distscale.GradScaler("cpu")
    with pytest.raises(TypeError, match="scheduler"):
        SkipAwareScheduler(object(), scaler)
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"distscale\.GradScaler"):
        SkipAwareScheduler(SCHEDULERS["step"](opt), torch.amp.GradScaler("cpu"))


def test_ema_skips_on_the_device_without_a_host_read() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    ema = [p.detach().clone() for p in model.parameters()]
    reference = [p.detach().clone() for p in model.parameters()]
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    plants = {1: INF, 2: NAN}
    for step in range(5):
        opt.zero_grad()
        _backward(model, scaler, step)
        if step in plants:
            _plant(model, plants[step])
        scaler.step(opt)
        scaler.update()
        before = [e.clone() for e in ema]
        with count_host_syncs() as reads:
            ema_update_(ema, model.parameters(), 0.9, scaler.step_was_skipped)
        assert sum(reads.values()) == 0
        if step in plants:
            assert all(torch.equal(a, b) for a, b in zip(before, ema, strict=True))
        else:
            ema_fn(reference, [p.detach() for p in model.parameters()], torch.tensor(step))
            for a, b in zip(ema, reference, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ema_update_(ema, model.parameters(), 0.9, True)  # a host bool works too
    with pytest.raises(ValueError, match="decay"):
        ema_update_(ema, model.parameters(), 1.5)
    with pytest.raises(ValueError, match="same length"):
        ema_update_(ema[:1], model.parameters(), 0.9)


# ---------------------------------------------------------------------------- diagnostics


def test_overflow_report_names_parameters_kinds_and_counts(caplog) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    scaler.set_parameter_names(model)
    _run(scaler, model, opt, {}, 1)
    assert scaler.last_overflow_report is None
    opt.zero_grad()
    _backward(model, scaler, 1)
    model[0].weight.grad.view(-1)[:3] = INF
    model[0].weight.grad.view(-1)[5] = NAN
    model[2].bias.grad[0] = NAN
    with caplog.at_level(logging.WARNING, logger="distscale"):
        scaler.step(opt)
        scaler.update()
    report = scaler.last_overflow_report
    assert report is not None and report.step == 1 and report.world_size == 1
    found = {g.name: (g.kind, g.num_inf, g.num_nan, g.numel) for g in report.grads}
    assert found == {"0.weight": ("inf+nan", 3, 1, 128), "2.bias": ("nan", 0, 1, 4)}
    assert "0.weight" in caplog.text and "2.bias" in caplog.text and "step 1" in caplog.text


def test_unnamed_parameters_get_their_optimizer_position() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    _run(scaler, model, opt, {0: INF}, 1)
    assert [g.name for g in scaler.last_overflow_report.grads] == ["param_groups[0]['params'][0]"]


@pytest.mark.parametrize(("fused", "reads"), [(False, 1), (True, 1)])
def test_diagnostics_cost_on_clean_steps(monkeypatch, fused: bool, reads: int) -> None:
    scans = []
    real_scan = diagnostics.scan
    monkeypatch.setattr(diagnostics, "scan", lambda *a: scans.append(1) or real_scan(*a))
    model = _model()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.01)
    )
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    for step in range(3):
        opt.zero_grad()
        _backward(model, scaler, step)
        with count_host_syncs() as counted:
            scaler.step(opt)
            scaler.update()
        # Non-fused: the one read step() makes anyway; fused: the one extra read diagnostics costs.
        assert sum(counted.values()) == reads, counted
    assert scans == [], "clean steps must not scan the gradients"


def test_diagnostics_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="overflow_diagnostics"):
        distscale.GradScaler("cpu", overflow_diagnostics=1)


# ---------------------------------------------------------------------------- underflow monitor


def test_underflow_fractions_are_exact_and_only_on_monitor_steps(monkeypatch) -> None:
    from distscale import underflow

    calls = []
    real_count = underflow.count
    monkeypatch.setattr(underflow, "count", lambda *a: calls.append(1) or real_count(*a))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = distscale.GradScaler("cpu", init_scale=1.0, underflow_every=3)
    numel = sum(p.numel() for p in model.parameters())
    for step in range(7):
        opt.zero_grad()
        _backward(model, scaler, step)
        grad = model[0].weight.grad.view(-1)
        grad[:10] = 0.0  # zeros
        grad[10:13] = 2.0**-25  # flushes to zero in fp16 (ties to even)
        grad[13:15] = -(2.0**-26)
        grad[15] = 2.0**-24  # the smallest fp16 subnormal: survives
        scaler.step(opt)
        scaler.update()
        m = scaler.metrics()
        if step % 3 == 0:
            zeros = sum(int((p.grad == 0).sum()) for p in model.parameters())
            assert zeros >= 10
            assert m["zero_fraction"] == pytest.approx(zeros / numel, rel=1e-6)
            assert m["underflow_fraction"] == pytest.approx(5 / numel, rel=1e-6)
    assert len(calls) == 3, "counted on updates 0, 3 and 6 only"


def test_underflow_every_is_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="underflow_every"):
            distscale.GradScaler("cpu", underflow_every=bad)


def test_underflow_counts_fp16_gradients_as_zeros() -> None:
    from distscale import underflow

    t = torch.tensor([0.0, 2.0**-24, 1.0, 0.0], dtype=torch.float16)
    assert underflow.count([t], torch.device("cpu")).tolist() == [2.0, 0.0, 4.0]
    assert all(math.isnan(f) for f in underflow.fractions(torch.zeros(3, dtype=torch.float64)))


# ---------------------------------------------------------------------------- real ranks


@pytest.mark.slow
def test_observability_on_two_ranks() -> None:
    setups = ["ddp", "fsdp1_orig", "fsdp2"]
    results = run_ranks(dc.job_observability, 2, setups)
    for setup in setups:
        r0, r1 = results[0][setup], results[1][setup]
        # Every rank reads the same metrics: same skip decisions, same norm, same fractions.
        for m0, m1 in zip(r0["metrics"], r1["metrics"], strict=True):
            assert m0 == pytest.approx(m1, rel=0, abs=0, nan_ok=True), setup
        skipped = [m["step_was_skipped"] for m in r0["metrics"]]
        assert skipped == [step in dc.PLANTS_2 for step in range(7)], (setup, skipped)
        assert r0["metrics"][-1]["overflows"] == len(dc.PLANTS_2)
        # grad_norm is what clip_grad_norm_ returned (under DDP a replica planted on rank 1 is
        # not counted in the norm, so a skipped step's norm may be finite there).
        for step, m in enumerate(r0["metrics"]):
            assert m["grad_norm"] == pytest.approx(r0["norms"][step], rel=1e-6, nan_ok=True), (setup, step)
            assert m["grad_norm"] > 0 or math.isnan(m["grad_norm"])
        # Diagnostics: rank 0 names the rank and kind of each planted value; rank 1 holds no report.
        for step, (plant_rank, value) in dc.PLANTS_2.items():
            report_step, grads = r0["reports"][step]
            assert report_step == step, (setup, step, r0["reports"][step])
            kind = "nan" if math.isnan(value) else "inf"
            assert [(g[0], g[2]) for g in grads] == [(plant_rank, kind)], (setup, step, grads)
            assert r1["reports"][step] is None
        # The monitor's job-wide fractions match the full gradients' (rank 0 planted them).
        for step, reference in enumerate(r0["reference"]):
            if reference is None:
                continue
            m = r0["metrics"][step]
            assert m["zero_fraction"] == pytest.approx(reference[0], rel=1e-5), (setup, step)
            assert m["underflow_fraction"] == pytest.approx(reference[1], rel=1e-5), (setup, step)
            assert reference[1] > 0
        # Clean steps, monitor steps included, keep the single collective.
        for rank_result in (r0, r1):
            clean = [c for step, c in enumerate(rank_result["collectives"]) if step not in dc.PLANTS_2]
            assert clean == [1] * len(clean), (setup, rank_result["collectives"])


@pytest.mark.slow
def test_observability_on_four_ranks_hsdp_and_tensor_parallel() -> None:
    """Replicate axes (HSDP) and TP shards: fractions counted once per element, reports per rank."""
    setups = ["hsdp", "fsdp2_tp"]
    results = run_ranks(dc.job_observability, 4, setups)
    for setup in setups:
        runs = [r[setup] for r in results]
        for step in range(7):
            values = [r["metrics"][step] for r in runs]
            assert all(v == pytest.approx(values[0], rel=0, abs=0, nan_ok=True) for v in values), (setup, step)
        for step, (plant_rank, value) in dc.PLANTS_2.items():
            report_step, grads = runs[0]["reports"][step]
            kind = "nan" if math.isnan(value) else "inf"
            assert report_step == step and {(g[0], g[2]) for g in grads} == {(plant_rank, kind)}, (setup, grads)
            assert all(r["reports"][step] is None for r in runs[1:])
        for step, reference in enumerate(runs[0]["reference"]):
            if reference is not None:
                m = runs[0]["metrics"][step]
                assert m["zero_fraction"] == pytest.approx(reference[0], rel=1e-5), (setup, step)
                assert m["underflow_fraction"] == pytest.approx(reference[1], rel=1e-5), (setup, step)
