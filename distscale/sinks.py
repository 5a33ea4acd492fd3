"""Where scaler metrics go: JSON lines, TensorBoard, the ``logging`` module, and a rank/step filter.

A sink takes ``write(step, values)`` with ``values`` a mapping of ``str`` to a plain number
(``float``, ``int``, ``bool``) or ``None``, e.g. ``scaler.metrics()`` plus the loss. Sinks never
touch tensors, so they never sync with a device; the one host sync is whoever builds ``values``
(``scaler.metrics()``, ``loss.item()``). :class:`MetricsLogger` decides *whether* to build them::

    logger = MetricsLogger([JsonlSink("metrics.jsonl"), TensorBoardSink("runs/x")], every=10)
    for step in range(steps):
        ...
        scaler.update()
        if logger.should_log(step):  # False on other ranks and off-steps: no host sync there
            logger.log(step, {**scaler.metrics(), "loss": loss.item()})
    logger.close()

Sinks open their file on the first ``write()``, so a sink built on every rank only creates a file
on the rank that writes.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar, runtime_checkable

import torch.distributed as dist

__all__ = [
    "JsonlSink",
    "LoggingSink",
    "MetricValue",
    "MetricsLogger",
    "MetricsSink",
    "TensorBoardSink",
]

MetricValue = float | int | bool | None

_S = TypeVar("_S", bound="_SinkBase")
_L = TypeVar("_L", bound="MetricsLogger")


@runtime_checkable
class MetricsSink(Protocol):
    """Receives one mapping of metric values per logged step."""

    def write(self, step: int, values: Mapping[str, MetricValue]) -> None:
        """Record ``values`` for training step ``step``."""

    def close(self) -> None:
        """Flush and release the sink's resources; calling it twice is harmless."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def _check_step(step: object) -> int:
    # bool is an int subclass; a flag passed as the step is a bug, not step 1.
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}.")
    return int(step)


def _clean_values(step: int, values: object) -> dict[str, MetricValue]:
    """Validate ``values`` and convert numpy scalars to Python ones (json and TensorBoard want those)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping of str to number, got {type(values).__name__}.")
    clean: dict[str, MetricValue] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"values keys must be str, got {type(key).__name__} {key!r}.")
        if key == "step":
            # A record that carries its own step (as launch/train.py's do) is fine if it agrees.
            if value != step:
                raise ValueError(
                    f"values['step'] must equal the step argument ({step}), got {value!r}; "
                    "drop the key or pass the same step."
                )
            continue
        if value is None or isinstance(value, bool):
            clean[key] = value
        elif isinstance(value, numbers.Integral):
            clean[key] = int(value)
        elif isinstance(value, numbers.Real):
            clean[key] = float(value)
        else:
            # Tensors are refused rather than .item()-ed here: that would hide a host sync per key.
            hint = " (call .item() once when building the dict)" if hasattr(value, "item") else ""
            raise TypeError(
                f"values[{key!r}] must be a float, int, bool or None, got {type(value).__name__}{hint}."
            )
    return clean


def _format(value: MetricValue) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _SinkBase:
    """Context-manager support shared by the sinks: ``with JsonlSink(p) as sink: ...`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class JsonlSink(_SinkBase):
    """One JSON object per ``write()``: ``{"step": step, **values}``, flushed at once.

    Non-finite floats (NaN, ±inf, e.g. ``grad_norm`` when not clipping) are written as ``null``, so
    every line is strict JSON that any reader accepts. ``append=True`` (the default) keeps lines of
    earlier runs, as a resumed job wants; readers let a later line win for a repeated step
    (:func:`distscale.plot.read_metrics`). ``append=False`` truncates the file at the first write.

    Acts on the rank that calls ``write()`` only (use :class:`MetricsLogger` to pick one); no host
    syncs. The parent directory is created if missing.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = True) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}.")
        if not isinstance(append, bool):
            raise TypeError(f"append must be a bool, got {type(append).__name__} {append!r}.")
        self.path = Path(path)
        self.append = append
        self._file: IO[str] | None = None
        self._closed = False

    def write(self, step: int, values: Mapping[str, MetricValue]) -> None:
        """Append one line for ``step``; the file is opened on the first call."""
        if self._closed:
            raise RuntimeError(f"JsonlSink({str(self.path)!r}) is closed; create a new sink to write again.")
        step = _check_step(step)
        record: dict[str, MetricValue] = {"step": step}
        for key, value in _clean_values(step, values).items():
            record[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        line = json.dumps(record, allow_nan=False)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
        self._file.write(line + "\n")
        # Flushed per line so a killed job leaves every finished step readable.
        self._file.flush()

    def close(self) -> None:
        """Close the file (if it was ever opened)."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink(_SinkBase):
    """``SummaryWriter.add_scalar(prefix + key, value, step)`` for every value.

    Booleans are written as 0/1, ``None`` is skipped, NaN and ±inf are passed through (TensorBoard
    shows them; dropping a NaN loss would hide the problem). The writer (and its event file) is
    created on the first ``write()``; ``close()`` flushes it, until then TensorBoard may lag by up
    to ``flush_secs``.

    Acts on the rank that calls ``write()`` only; no host syncs. Needs the ``tensorboard`` package:
    ``pip install "distscale[tensorboard]"``.
    """

    _writer_cls: Any
    log_dir: Path
    prefix: str
    flush_secs: float
    _closed: bool

    def __init__(
        self, log_dir: str | os.PathLike[str], prefix: str = "scaler/", flush_secs: float = 30.0
    ) -> None:
        if not isinstance(log_dir, str | os.PathLike):
            raise TypeError(
                f"log_dir must be a str or os.PathLike, got {type(log_dir).__name__} {log_dir!r}."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}.")
        if (
            not isinstance(flush_secs, numbers.Real)
            or isinstance(flush_secs, bool)
            or not (math.isfinite(flush_secs) and flush_secs > 0)
        ):
            raise ValueError(f"flush_secs must be a finite number > 0, got {flush_secs!r}.")
        # Imported here, not at construction of the writer, so a missing package fails at once.
        self._writer_cls = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.flush_secs = float(flush_secs)
        self._writer: Any = None
        self._closed = False

    def write(self, step: int, values: Mapping[str, MetricValue]) -> None:
        """Add one scalar per non-``None`` value at ``global_step=step``."""
        if self._closed:
            raise RuntimeError(
                f"TensorBoardSink({str(self.log_dir)!r}) is closed; create a new sink to write again."
            )
        step = _check_step(step)
        clean = _clean_values(step, values)
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        for key, value in clean.items():
            if value is None:
                continue
            self._writer.add_scalar(self.prefix + key, float(value), global_step=step)

    def close(self) -> None:
        """Flush and close the event file (if one was created)."""
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises this when the tensorboard package is missing
        raise ImportError(
            f'TensorBoardSink needs the tensorboard package: pip install "distscale[tensorboard]" ({err})'
        ) from err
    return SummaryWriter


class LoggingSink(_SinkBase):
    """One compact line per ``write()``: ``step 12: scale=6.554e+04 loss=3.91 step_was_skipped=0``.

    Goes to ``logger`` (default: the ``"distscale"`` logger) at ``level``; whether it shows is up to
    the application's logging configuration. Floats use 4 significant digits. Acts on the rank that
    calls ``write()`` only; no host syncs.
    """

    def __init__(self, logger: logging.Logger | str | None = None, level: int | str = logging.INFO) -> None:
        if logger is None:
            logger = logging.getLogger("distscale")
        elif isinstance(logger, str):
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise TypeError(
                f"logger must be a logging.Logger, a logger name or None, got {type(logger).__name__} {logger!r}."
            )
        self.logger = logger
        self.level = _check_level(level)

    def write(self, step: int, values: Mapping[str, MetricValue]) -> None:
        """Log ``values`` for ``step`` as ``key=value`` pairs in their given order."""
        step = _check_step(step)
        clean = _clean_values(step, values)
        if not self.logger.isEnabledFor(self.level):
            return
        pairs = " ".join(f"{key}={_format(value)}" for key, value in clean.items())
        self.logger.log(self.level, "step %d: %s", step, pairs)

    def close(self) -> None:
        """Nothing to release: the logger belongs to the application."""


def _check_level(level: object) -> int:
    if isinstance(level, str):
        # getLevelName maps a registered name to its number (and anything else to "Level ...").
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"level must be a logging level such as logging.INFO or 'INFO', got {level!r}.")
        return number
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ValueError(f"level must be a logging level such as logging.INFO or 'INFO', got {level!r}.")
    return level


class MetricsLogger:
    """Sends ``values`` to every sink, on one rank, every ``every`` steps.

    ``rank`` is the global rank that logs (default 0). Without an initialized process group the
    process counts as rank 0 of 1, so the default logs there too. The rank is looked up at each
    call, so the logger may be built before ``init_process_group``.

    Only the logging rank writes; other ranks return at once. No collectives and no host syncs here:
    ``should_log(step)`` exists so that callers skip building ``values`` (``scaler.metrics()`` is a
    host sync) on every rank and step that would not log it::

        if logger.should_log(step):
            logger.log(step, {**scaler.metrics(), "loss": loss.item()})

    ``should_log`` differs between ranks. Anything that *all* ranks must do together for a record
    (e.g. all-reducing the loss) must be gated on :meth:`is_log_step` instead, which is rank-free.
    """

    def __init__(
        self, sinks: MetricsSink | Iterable[MetricsSink], every: int = 1, rank: int | None = None
    ) -> None:
        if hasattr(sinks, "write") and hasattr(sinks, "close"):
            sinks = [sinks]  # type: ignore[list-item]  # one sink given bare
        if not isinstance(sinks, Iterable) or isinstance(sinks, str | bytes):
            raise TypeError(f"sinks must be a sink or an iterable of sinks, got {type(sinks).__name__}.")
        sinks = list(sinks)
        for i, sink in enumerate(sinks):
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise TypeError(
                    f"sinks[{i}] must have write(step, values) and close() methods "
                    f"(see distscale.sinks.MetricsSink), got {type(sink).__name__} {sink!r}."
                )
        if not isinstance(every, int) or isinstance(every, bool):
            raise TypeError(f"every must be an int, got {type(every).__name__} {every!r}.")
        if every < 1:
            raise ValueError(f"every must be >= 1 (1 logs every step), got {every!r}.")
        if rank is not None:
            if not isinstance(rank, int) or isinstance(rank, bool):
                raise TypeError(f"rank must be an int or None, got {type(rank).__name__} {rank!r}.")
            if rank < 0:
                raise ValueError(f"rank must be >= 0 (the global rank that logs), got {rank!r}.")
        self.sinks: list[MetricsSink] = sinks
        self.every = every
        self.rank = 0 if rank is None else rank

    def is_log_step(self, step: int) -> bool:
        """True when ``step`` is logged (``step % every == 0``); the same answer on every rank."""
        return _check_step(step) % self.every == 0

    def is_logging_rank(self) -> bool:
        """True on the rank that writes. Raises ValueError if ``rank`` is not below the world size."""
        if dist.is_available() and dist.is_initialized():
            world, me = dist.get_world_size(), dist.get_rank()
        else:
            world, me = 1, 0
        if self.rank >= world:
            raise ValueError(
                f"rank must be < the world size ({world}), got {self.rank}; it names the rank that logs "
                "(not this process's rank): leave it None for rank 0."
            )
        return me == self.rank

    def should_log(self, step: int) -> bool:
        """True when this rank logs ``step``: build the values (and sync) only then."""
        return self.is_log_step(step) and self.is_logging_rank()

    def log(self, step: int, values: Mapping[str, MetricValue]) -> bool:
        """Write ``values`` to every sink if :meth:`should_log` (``step``); returns whether it did."""
        if not self.should_log(step):
            return False
        for sink in self.sinks:
            sink.write(step, values)
        return True

    def close(self) -> None:
        """Close every sink (on every rank: unopened sinks close at no cost); the first error wins."""
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # close the rest before reporting
                first = first or err
        if first is not None:
            raise first

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
