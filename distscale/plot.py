"""Read a metrics JSON-lines file and draw the loss scale's history as one PNG.

The file is what ``launch/train.py --metrics`` or :class:`distscale.sinks.JsonlSink` writes: one
object per step with at least ``"step"``, and any of ``"scale"``, ``"loss"``, ``"grad_norm"``,
``"skipped"`` (or ``"step_was_skipped"``), ``"zero_fraction"``, ``"underflow_fraction"``,
``"headroom_log2"``, ``"scale_change"`` (a code of :data:`distscale.stats.SCALE_CHANGES`); plus
summary lines (``"summary": true``) that are not steps. Host-only code, no ranks.
Needs matplotlib: ``pip install "distscale[plot]"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DPI",
    "FIGSIZE",
    "overflow_rate",
    "plot_metrics",
    "read_metrics",
    "scale_changes",
    "skip_reason",
    "skipped_flag",
]

# Fixed so the PNG is always 1000 x 800 px (no tight bbox, which would crop to content).
FIGSIZE = (10.0, 8.0)
DPI = 100
SKIP_COLOR = "#d62728"  # red markers for skipped steps
# Markers for the scale changes that are not backoffs (those are the skipped steps' markers).
CHANGE_MARKERS = {"grew": ("^", "#2ca02c"), "calibrated": ("*", "#9467bd"), "held_at_min": ("x", "#000000")}


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The step records of ``path``, sorted by step.

    Blank lines and summary lines (``"summary": true``) are skipped. A file appended to by a
    resumed run repeats steps: the later line wins. ``NaN``/``Infinity`` tokens (Python's
    ``json.dumps`` writes them) are accepted. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the file and line number for a line that is not a JSON object with an
    integer ``"step"``.
    """
    path = Path(path)
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if record.get("summary"):
                continue
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f'{path}:{lineno}: expected an integer "step", got {step!r}')
            by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def skipped_flag(record: Mapping[str, Any]) -> bool | None:
    """Whether the record's step was skipped: ``"skipped"`` (train.py) or ``"step_was_skipped"``
    (``GradScaler.metrics()``); ``None`` if neither is recorded."""
    for key in ("skipped", "step_was_skipped"):
        value = record.get(key)
        if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            return bool(value)
    return None


# Skipped steps by reason (the records' "skip_reason" codes, distscale.rules.SKIP_REASONS).
SKIP_MARKERS = {
    "overflow": ("v", SKIP_COLOR),
    "norm_spike": ("^", "#ff7f0e"),
    "loss_spike": ("s", "#9467bd"),
    "fault": ("X", "#000000"),
}


def skip_reason(record: Mapping[str, Any]) -> str:
    """Why the record's (skipped) step was skipped: a ``SKIP_REASONS`` name from its
    ``"skip_reason"`` code, or "skipped" when the record has none (older metrics, other scalers)."""
    from distscale.rules import SKIP_REASONS  # the codes' one home (imports torch: only when asked)

    code = record.get("skip_reason")
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < len(SKIP_REASONS):
        return SKIP_REASONS[code]
    return "skipped"


def _finite(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of ``key``; records without it (None, NaN, absent) are left out."""
    steps, values = [], []
    for record in records:
        value = _finite(record, key)
        if value is not None:
            steps.append(record["step"])
            values.append(value)
    return steps, values


def overflow_rate(steps: Sequence[int], flags: Sequence[bool], window: int) -> list[float]:
    """For each record, the fraction of skipped records among those with step in (step - window, step].

    With one record per step this is the overflow rate over the last ``window`` steps; with sparser
    logging it is the rate among the logged steps in that span.
    """
    import numpy as np

    s = np.asarray(steps, dtype=np.int64)
    skipped = np.concatenate([[0], np.cumsum(np.asarray(flags, dtype=np.int64))])
    start = np.searchsorted(s, s - window, side="right")  # first index inside the window
    end = np.arange(1, len(s) + 1)
    return ((skipped[end] - skipped[start]) / (end - start)).tolist()


def scale_changes(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, new scale) of each scale change that is not a backoff, by reason (the keys of
    ``CHANGE_MARKERS``, only those that occur), from the records' ``"scale_change"`` codes."""
    from distscale.stats import SCALE_CHANGES  # the codes' one home (imports torch: only when asked)

    changes: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        code, scale = record.get("scale_change"), _finite(record, "scale")
        if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < len(SCALE_CHANGES):
            reason = SCALE_CHANGES[code]
            if reason in CHANGE_MARKERS and scale is not None and scale > 0:
                changes.setdefault(reason, []).append((record["step"], scale))
    return changes


def _not_recorded(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_yticks([])


def _line_panel(
    ax: Any, records: Sequence[Mapping[str, Any]], key: str, color: str, log_when_positive: bool
) -> None:
    label = key.replace("_", " ")
    steps, values = _series(records, key)
    if steps:
        ax.plot(steps, values, color=color, lw=1)
        if log_when_positive and min(values) > 0:
            ax.set_yscale("log")
    else:
        _not_recorded(ax, label)
    ax.set_ylabel(label)


def plot_metrics(
    records: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    window: int = 50,
    title: str | None = None,
) -> Path:
    """Draw ``records`` (as from :func:`read_metrics`) into ``out_path`` and return it as a Path.

    Panels, sharing the step axis: log2(scale) with skipped steps as red markers at their scale and
    the other scale changes (grew, calibrated, held at min_scale) marked by reason; loss; grad norm
    (log y when all positive); the overflow rate over ``window`` steps; and, only if recorded, the
    fp16 headroom (log2 of 65504 / amax) and the zero and underflow fractions. A panel without data says "not recorded". The image
    is 10 x 8 in at 100 dpi (1000 x 800 px for a PNG); the format follows ``out_path``'s suffix and
    its parent directory is created if missing.
    """
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"window must be an int, got {type(window).__name__} {window!r}.")
    if window < 1:
        raise ValueError(f"window must be >= 1 (steps per overflow-rate window), got {window!r}.")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__} {title!r}.")
    records = sorted(records, key=lambda r: r["step"])
    if not records:
        raise ValueError("records is empty: there are no step records to plot.")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f'plot_metrics needs matplotlib: pip install "distscale[plot]" ({err})') from err

    fractions = [k for k in ("zero_fraction", "underflow_fraction") if _series(records, k)[0]]
    headroom = bool(_series(records, "headroom_log2")[0])
    # A bare Figure on an Agg canvas: no pyplot, no global backend switch, no display needed.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4 + headroom + bool(fractions), 1, sharex=True)
    fig.suptitle(title if title is not None else f"distscale: {len(records)} steps")

    # 1. log2(scale), with skipped steps marked where the scale was when they were skipped.
    ax = axes[0]
    steps, scales = _series([r for r in records if (_finite(r, "scale") or 0) > 0], "scale")
    if steps:
        ax.plot(steps, [math.log2(v) for v in scales], drawstyle="steps-post", color="#1f77b4", lw=1)
        # A record's scale is the one update() left; the step itself ran at the previous record's.
        marks: dict[str, list[tuple[int, float]]] = {}
        previous: float | None = None
        for r in records:
            v = _finite(r, "scale")
            used = previous if previous is not None else v
            if skipped_flag(r) and used is not None and used > 0:
                marks.setdefault(skip_reason(r), []).append((r["step"], math.log2(used)))
            if v is not None and v > 0:
                previous = v
        for reason, points in marks.items():
            marker, color = SKIP_MARKERS.get(reason, ("v", SKIP_COLOR))
            label = "skipped" if reason == "skipped" else f"skipped: {reason.replace('_', ' ')}"
            ax.scatter(*zip(*points, strict=True), color=color, marker=marker, s=18, zorder=3, label=label)
        for reason, changed in scale_changes(records).items():
            marker, color = CHANGE_MARKERS[reason]
            points = [(step, math.log2(scale)) for step, scale in changed]
            ax.scatter(*zip(*points, strict=True), color=color, marker=marker, s=24, zorder=3, label=reason)
        if ax.collections:
            ax.legend(loc="best", fontsize="small")
    else:
        _not_recorded(ax, "scale")
    ax.set_ylabel("log2(scale)")

    # 2. loss; 3. grad norm (NaN/None when not clipping, so often absent; log y when positive).
    _line_panel(axes[1], records, "loss", "#2ca02c", log_when_positive=False)
    _line_panel(axes[2], records, "grad_norm", "#9467bd", log_when_positive=True)

    # 4. overflow rate per window.
    ax = axes[3]
    flagged = [(r["step"], flag) for r in records if (flag := skipped_flag(r)) is not None]
    if flagged:
        fsteps, flags = zip(*flagged, strict=True)
        ax.plot(fsteps, overflow_rate(fsteps, flags, window), color=SKIP_COLOR, lw=1)
        ax.set_ylim(-0.02, 1.02)
    else:
        _not_recorded(ax, "skipped steps")
    ax.set_ylabel(f"overflow rate\n({window} steps)")

    # 5. the headroom the largest scaled gradient left below fp16's maximum (the amax rule's input).
    if headroom:
        ax = axes[4]
        steps, values = _series(records, "headroom_log2")
        ax.plot(steps, values, color="#8c564b", lw=1)
        ax.axhline(0.0, color=SKIP_COLOR, lw=0.8, ls="--")  # at 0 the largest gradient is at 65504
        ax.set_ylabel("fp16 headroom\nlog2(65504/amax)")

    # 6. zero / underflow fractions, log y when positive: they are often tiny next to each other.
    if fractions:
        ax = axes[-1]
        positive = True
        for key, color in zip(fractions, ("#7f7f7f", "#ff7f0e"), strict=False):
            steps, values = _series(records, key)
            ax.plot(steps, values, color=color, lw=1, label=key.replace("_", " "))
            positive = positive and min(values) > 0
        if positive:
            ax.set_yscale("log")
        ax.legend(loc="upper left", fontsize="small")
        ax.set_ylabel("fraction of\ngrad elements")

    axes[-1].set_xlabel("step")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
