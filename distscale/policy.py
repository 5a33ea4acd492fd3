"""The loss-scale rule as a pure function: ``update(state, found_inf, config) -> state``.

No host sync and no Python branch on a device value (``torch.where`` only), so the rule runs
inside CUDA graphs and ``torch.compile`` and is tested on CPU. This module never touches gradients
or ``torch.distributed``: the caller hands it a ``found_inf`` that is already the same on every
rank, so every rank computes the same next state.

The rule, with ``found = found_inf > 0``::

    if found:                                   # the step was skipped
        growth_tracker = -growth_delay
        backoff = hysteresis_tracker <= 1       # hysteresis spent
        if tolerance > 0:                       # fairseq: enough overflows since the last rescale
            backoff &= (overflows_since_backoff + 1) / (steps_since_rescale + 1) >= tolerance
        new = scale * backoff_factor if backoff else scale
        if min_scale_rule is "floor":           # clamp; an event when backing off from the floor
            if backoff and scale <= min_scale: num_min_scale_events += 1
            if backoff: scale = max(new, min_scale)
        else:                                   # "refuse": keep the scale rather than reach min_scale
            if new <= min_scale: num_min_scale_events += 1
            else: scale = new
        hysteresis_tracker = max(hysteresis_tracker - 1, 0)
    else:
        growth_tracker += 1
        if growth_tracker >= growth_interval:   # grow, never to inf, never past max_scale
            grown = scale * growth_factor
            if isfinite(grown): scale = min(grown, max_scale)
            growth_tracker = 0
        if refill is "clean_step" or the scale just grew (refill "growth"):
            hysteresis_tracker = hysteresis
    steps_since_rescale = 0 if backoff or growth else steps_since_rescale + 1
    overflows_since_backoff = 0 if backoff else overflows_since_backoff + found

With ``hysteresis=1`` and no bounds this is ``torch._amp_update_scale_`` step for step: products
are taken in float64 and rounded once to float32, as torch's kernels do. The last two counters
only feed ``tolerance``; they are kept (and checkpointed) whatever the settings, and a backoff
refused by ``min_scale_rule="refuse"`` resets them as fairseq does before it raises.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch

from distscale import fields
from distscale.config import ScalerConfig
from distscale.fields import Field

__all__ = ["ScaleState", "init_state", "update"]


class ScaleState(NamedTuple):
    """Everything the rule reads and writes; 0-dim tensors on one device. Each field is declared
    once, here (see :mod:`distscale.fields`): checkpoint keys and metrics derive from it."""

    scale: Annotated[torch.Tensor, Field(torch.float32, lambda c: c.init_scale)]
    growth_tracker: Annotated[torch.Tensor, Field(torch.int32, lambda c: -c.growth_delay)]
    """Clean steps since the last overflow or growth."""
    hysteresis_tracker: Annotated[torch.Tensor, Field(torch.int32, lambda c: c.hysteresis)]
    """Overflows left before a backoff."""
    num_updates: Annotated[torch.Tensor, Field(torch.int64, 0)]
    """update() calls that applied the rule."""
    num_skipped: Annotated[torch.Tensor, Field(torch.int64, 0)]
    """Steps skipped for inf/NaN."""
    num_min_scale_events: Annotated[torch.Tensor, Field(torch.int64, 0)]
    """Min-scale events (see ScalerConfig.min_scale_rule)."""
    steps_since_rescale: Annotated[torch.Tensor, Field(torch.int64, 0, since=2)]
    """Updates since the last backoff or growth."""
    overflows_since_backoff: Annotated[torch.Tensor, Field(torch.int64, 0, since=2)]
    """Overflows since the last backoff."""

    def to(self, device: torch.device | str) -> ScaleState:
        return ScaleState(*(t.to(device) for t in self))


STATE_DTYPES = fields.dtypes(ScaleState)


def init_state(config: ScalerConfig, device: torch.device | str = "cpu") -> ScaleState:
    """Fresh state: ``init_scale``, trackers at rest, counters at zero."""
    return fields.allocate(ScaleState, config, device)


def _times(scale: torch.Tensor, factor: float) -> torch.Tensor:
    # float64 product rounded once to float32: what torch's update kernels compute.
    return (scale.double() * factor).float()


def update(state: ScaleState, found_inf: torch.Tensor, config: ScalerConfig) -> ScaleState:
    """Apply one step of the rule. ``found_inf``: 0-dim float, > 0 when any gradient overflowed.

    Pure: returns new tensors, never syncs. The caller guarantees that ``found_inf`` is the
    job-wide value (already reduced across ranks), so all ranks stay identical.
    """
    scale, growth_tracker, hysteresis_tracker = state.scale, state.growth_tracker, state.hysteresis_tracker
    found = found_inf.to(scale.device) > 0
    min_scale = 0.0 if config.min_scale is None else config.min_scale
    max_scale = float("inf") if config.max_scale is None else config.max_scale

    do_backoff = found & (hysteresis_tracker <= 1)
    if config.tolerance > 0:
        # float64 quotient, as fairseq's Python float division.
        ratio = (state.overflows_since_backoff + 1).double() / (state.steps_since_rescale + 1).double()
        do_backoff = do_backoff & (ratio >= config.tolerance)
    backed_off = _times(scale, config.backoff_factor)
    if config.min_scale is None:
        min_event = found & False
        apply_backoff = do_backoff
    elif config.min_scale_rule == "floor":
        min_event = do_backoff & (scale <= min_scale)
        apply_backoff = do_backoff
        backed_off = torch.clamp(backed_off, min=min_scale)
    else:  # "refuse": keep the scale when it would end at or below min_scale
        min_event = found & (torch.where(do_backoff, backed_off, scale) <= min_scale)
        apply_backoff = do_backoff & ~min_event

    successful = growth_tracker + 1
    do_growth = ~found & (successful >= config.growth_interval)
    grown = _times(scale, config.growth_factor)
    grown_ok = do_growth & torch.isfinite(grown)

    new_scale = torch.where(
        apply_backoff, backed_off, torch.where(grown_ok, torch.clamp(grown, max=max_scale), scale)
    )
    # Python scalars in torch.where keep the tensor's dtype and cost no extra kernel.
    if config.growth_delay == 0:
        new_growth_tracker = torch.where(found | do_growth, 0, successful)
    else:
        new_growth_tracker = torch.where(found, -config.growth_delay, torch.where(do_growth, 0, successful))
    refill = do_growth if config.hysteresis_refill == "growth" else ~found
    new_hysteresis = torch.where(
        found,
        torch.clamp(hysteresis_tracker - 1, min=0),
        torch.where(refill, config.hysteresis, hysteresis_tracker),
    )
    steps, overflows = state.steps_since_rescale, state.overflows_since_backoff
    return ScaleState(
        scale=new_scale,
        growth_tracker=new_growth_tracker,
        hysteresis_tracker=new_hysteresis,
        num_updates=state.num_updates + 1,
        num_skipped=state.num_skipped + found.to(state.num_skipped.dtype),
        num_min_scale_events=state.num_min_scale_events + min_event.to(torch.int64),
        steps_since_rescale=torch.where(do_backoff | do_growth, 0, steps + 1),
        overflows_since_backoff=torch.where(do_backoff, 0, overflows + found.to(overflows.dtype)),
    )
