"""What the scaler did, kept on the device: counters that ``update()`` advances with no host sync.

Like :mod:`distscale.policy`, a pure function of tensors (``torch.where`` only), so it runs inside
CUDA graphs and is the same on every rank: its inputs (the job-wide ``found_inf``, the new scale,
the reduced norm and underflow counts) are already identical across ranks.

The counters complement :class:`~distscale.policy.ScaleState`, which already counts updates
(``num_updates``) and skipped steps (``num_skipped``); these are the ones the rule does not need
but a person watching a run does (torch#55585, DeepSpeed#8415: "was this step skipped, and is
the scale healthy?").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, NamedTuple

import torch

from distscale import fields
from distscale.config import FP16_MAX, ScalerConfig
from distscale.fields import Field

if TYPE_CHECKING:
    from distscale.policy import ScaleState
    from distscale.rules import Decision

__all__ = [
    "SCALE_CHANGES",
    "STATS_DTYPES",
    "ScalerStats",
    "StepOutcome",
    "headroom_log2",
    "init_stats",
    "update_stats",
]

# Smallest magnitude that survives a cast to float16: 2**-25 rounds (to even) to zero, anything
# above rounds to at least the smallest subnormal 2**-24.
FP16_FLUSH = 2.0**-25


class ScalerStats(NamedTuple):
    """0-dim tensors on the scale's device. NaN means "not measured". Each field is declared once,
    here (see :mod:`distscale.fields`): checkpoint keys and metric names derive from it."""

    overflows: Annotated[torch.Tensor, Field(torch.int64, 0, since=3)]
    """Optimizer steps skipped for inf/NaN (each optimizer counts)."""
    consecutive_overflows: Annotated[torch.Tensor, Field(torch.int64, 0, since=3)]
    """Skipped steps in a row, ending at the last update."""
    max_consecutive_overflows: Annotated[torch.Tensor, Field(torch.int64, 0, since=3)]
    """The longest such run so far."""
    steps_since_overflow: Annotated[torch.Tensor, Field(torch.int64, 0, since=3)]
    """Updates since the last skipped step."""
    steps_at_min_scale: Annotated[torch.Tensor, Field(torch.int64, 0, since=3)]
    """Updates that left the scale at min_scale."""
    step_was_skipped: Annotated[torch.Tensor, Field(torch.bool, False, since=3)]
    """The last update's step was skipped (any optimizer)."""
    grad_norm: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=3)]
    """Job-wide norm of the unscaled grads; NaN if the step did not clip."""
    zero_fraction: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=3)]
    """Last underflow-monitor reading (see underflow.py)."""
    underflow_fraction: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=3)]
    """Idem."""
    amax: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=4)]
    """The step's job-wide largest |scaled gradient|; NaN if not measured (only the "amax" rule
    measures it) or the step was skipped."""
    headroom_log2: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=4)]
    """floor(log2(65504 / amax)): doublings of the scale fp16 had left at the largest gradient."""
    scale_change: Annotated[torch.Tensor, Field(torch.int64, 0, since=4)]
    """What the last update did to the scale: an index into ``SCALE_CHANGES``."""

    def to(self, device: torch.device | str) -> ScalerStats:
        return ScalerStats(*(t.to(device) for t in self))


STATS_DTYPES = fields.dtypes(ScalerStats)


SCALE_CHANGES = ("unchanged", "grew", "backed_off", "calibrated", "held_at_min")
"""``scale_change`` codes: the rule grew the scale, backed it off, set it from a measured amax
(the "amax" rule's first clean step), or an overflow found it at ``min_scale`` (a min-scale event)."""


def init_stats(device: torch.device | str = "cpu") -> ScalerStats:
    return fields.allocate(ScalerStats, ScalerConfig(), device)  # no field depends on the settings


class StepOutcome(NamedTuple):
    """What one step tells the rule and the metrics: job-wide values, identical on every rank."""

    found_inf: torch.Tensor
    """0-dim; > 0 when the step was skipped."""
    overflows: torch.Tensor | None = None
    """How many optimizers skipped (None: 1 if skipped)."""
    grad_norm: torch.Tensor | None = None
    """The step's reduced clip norm; None when it did not clip."""
    underflow: tuple[torch.Tensor, torch.Tensor] | None = None
    """(zero, underflow) fractions on monitor steps; the last reading is kept otherwise."""
    skipped_host: bool | None = None
    """The skip, when already known on the host (None: not read; reading it is a sync)."""
    amax: torch.Tensor | None = None
    """The step's job-wide largest |scaled gradient| (None: not measured)."""
    held: torch.Tensor | None = None
    """0-dim bool: skipped by a skip rule or a suspected fault, not an overflow (None: no rules;
    see :mod:`distscale.rules`)."""
    decision: Decision | None = None
    """The rules' decision for the step (None: no rules)."""


def headroom_log2(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(65504 / amax)) as float32, read off the float64 exponent bits (exact, and the
    same bits in the fused kernel); +inf for amax 0, NaN for NaN."""
    ratio = FP16_MAX / amax.to(torch.float64)
    exponent = (torch.bitwise_right_shift(ratio.view(torch.int64), 52) & 0x7FF) - 1023
    value = torch.where(amax == 0, float("inf"), exponent.to(torch.float32))
    return torch.where(torch.isnan(amax), float("nan"), value)


def update_stats(
    stats: ScalerStats, outcome: StepOutcome, old: ScaleState, new: ScaleState, config: ScalerConfig
) -> ScalerStats:
    """Advance the counters by one update (``old``/``new``: the rule's state before and after).
    Pure, no host sync."""
    device = stats.overflows.device
    new_scale = new.scale
    found = outcome.found_inf.to(device) > 0
    overflows, grad_norm, underflow = outcome.overflows, outcome.grad_norm, outcome.underflow
    if overflows is None:
        overflows = found.to(torch.int64)
    skipped = found if outcome.held is None else found | outcome.held.to(device)
    consecutive = torch.where(found, stats.consecutive_overflows + 1, 0)
    if config.min_scale is None:
        at_min = torch.zeros_like(stats.steps_at_min_scale)
    else:
        at_min = (new_scale.to(device) <= config.min_scale).to(torch.int64)
    nan = torch.full_like(stats.grad_norm, float("nan"))
    amax = nan if outcome.amax is None else torch.where(found, nan, outcome.amax.to(device, torch.float32))
    zero_fraction, underflow_fraction = stats.zero_fraction, stats.underflow_fraction
    if underflow is not None:
        zero_fraction, underflow_fraction = (u.to(device=device, dtype=torch.float32) for u in underflow)
    return ScalerStats(
        overflows=stats.overflows + overflows.to(device=device, dtype=torch.int64),
        consecutive_overflows=consecutive,
        max_consecutive_overflows=torch.maximum(stats.max_consecutive_overflows, consecutive),
        steps_since_overflow=torch.where(found, 0, stats.steps_since_overflow + 1),
        steps_at_min_scale=stats.steps_at_min_scale + at_min,
        step_was_skipped=skipped,
        grad_norm=nan if grad_norm is None else grad_norm.to(device=device, dtype=torch.float32),
        zero_fraction=zero_fraction,
        underflow_fraction=underflow_fraction,
        amax=amax,
        headroom_log2=headroom_log2(amax),
        scale_change=_scale_change(old, new).to(device),
    )


def _scale_change(old: ScaleState, new: ScaleState) -> torch.Tensor:
    calibrated = new.calibrated > old.calibrated
    grew, backed_off = new.scale > old.scale, new.scale < old.scale
    held = new.num_min_scale_events > old.num_min_scale_events
    return torch.where(
        calibrated, 3, torch.where(grew, 1, torch.where(backed_off, 2, torch.where(held, 4, 0)))
    )
