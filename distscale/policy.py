"""The loss-scale rule as a pure function: ``update(state, found_inf, config) -> state``.

No host sync and no Python branch on a device value (``torch.where`` only), so the rule runs
inside CUDA graphs and ``torch.compile`` and is tested on CPU. This module never touches gradients
or ``torch.distributed``: the caller hands it a ``found_inf`` that is already the same on every
rank, so every rank computes the same next state.

The rule, with ``found = found_inf > 0``::

    if found:                                   # the step was skipped
        growth_tracker = 0
        if hysteresis_tracker <= 1:             # hysteresis spent: back off
            if scale <= min_scale: num_min_scale_events += 1
            scale = max(scale * backoff_factor, min_scale)
        hysteresis_tracker = max(hysteresis_tracker - 1, 0)
    else:
        growth_tracker += 1
        if growth_tracker >= growth_interval:   # grow, never to inf, never past max_scale
            grown = scale * growth_factor
            if isfinite(grown): scale = min(grown, max_scale)
            growth_tracker = 0
        if refill is "clean_step" or the scale just grew (refill "growth"):
            hysteresis_tracker = hysteresis

With ``hysteresis=1`` and no bounds this is ``torch._amp_update_scale_`` step for step: products
are taken in float64 and rounded once to float32, as torch's kernels do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distscale.config import ScalerConfig

__all__ = ["ScaleState", "init_state", "update"]


class ScaleState(NamedTuple):
    """Everything the rule reads and writes; 0-dim tensors on one device."""

    scale: torch.Tensor  # float32
    growth_tracker: torch.Tensor  # int32: clean steps since the last overflow or growth
    hysteresis_tracker: torch.Tensor  # int32: overflows left before a backoff
    num_updates: torch.Tensor  # int64: update() calls that applied the rule
    num_skipped: torch.Tensor  # int64: steps skipped for inf/NaN
    num_min_scale_events: torch.Tensor  # int64: overflows that found the scale at min_scale

    def to(self, device: torch.device | str) -> ScaleState:
        return ScaleState(*(t.to(device) for t in self))


STATE_DTYPES: dict[str, torch.dtype] = {
    "scale": torch.float32,
    "growth_tracker": torch.int32,
    "hysteresis_tracker": torch.int32,
    "num_updates": torch.int64,
    "num_skipped": torch.int64,
    "num_min_scale_events": torch.int64,
}


def init_state(config: ScalerConfig, device: torch.device | str = "cpu") -> ScaleState:
    """Fresh state: ``init_scale``, trackers at rest, counters at zero."""
    values = {
        "scale": config.init_scale,
        "growth_tracker": 0,
        "hysteresis_tracker": config.hysteresis,
        "num_updates": 0,
        "num_skipped": 0,
        "num_min_scale_events": 0,
    }
    return ScaleState(
        **{k: torch.full((), v, dtype=STATE_DTYPES[k], device=device) for k, v in values.items()}
    )


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
    min_event = do_backoff & (scale <= min_scale) if config.min_scale is not None else found & False
    backed_off = torch.clamp(_times(scale, config.backoff_factor), min=min_scale)

    successful = growth_tracker + 1
    do_growth = ~found & (successful >= config.growth_interval)
    grown = _times(scale, config.growth_factor)
    grown_ok = do_growth & torch.isfinite(grown)

    new_scale = torch.where(
        do_backoff, backed_off, torch.where(grown_ok, torch.clamp(grown, max=max_scale), scale)
    )
    zero = torch.zeros_like(growth_tracker)
    new_growth_tracker = torch.where(found | do_growth, zero, successful)
    refill = do_growth if config.hysteresis_refill == "growth" else ~found
    new_hysteresis = torch.where(
        found,
        torch.clamp(hysteresis_tracker - 1, min=0),
        torch.where(refill, torch.full_like(hysteresis_tracker, config.hysteresis), hysteresis_tracker),
    )
    return ScaleState(
        scale=new_scale,
        growth_tracker=new_growth_tracker,
        hysteresis_tracker=new_hysteresis,
        num_updates=state.num_updates + 1,
        num_skipped=state.num_skipped + found.to(state.num_skipped.dtype),
        num_min_scale_events=state.num_min_scale_events + min_event.to(torch.int64),
    )
