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

With ``rule="amax"`` (``amax``: the job-wide largest |scaled gradient| of the step, see
:mod:`distscale.overflow`), the scale follows the measured headroom: the first clean step
calibrates it, and growth is gated by, and sized from, the largest amax of the growth interval::

    measured = not found and isfinite(amax)
    peak = max(amax_window, amax) if measured else amax_window
    fitted = pow2_floor(scale * FP16_MAX / (peak * amax_margin)), within the bounds
    if measured and not calibrated and amax > 0:     # the first clean step picks the scale
        scale = fitted; calibrated = True; growth_tracker = 0
    elif the growth above is due:                    # never blindly
        if measured and peak * growth_factor * amax_margin <= FP16_MAX:
            scale = max(scale * growth_factor, fitted if peak > 0 else 0), at most max_scale
        else:                                        # refused: a new interval begins
            growth_tracker = 0; peak = 0
    amax_window = 0 if the scale changed else peak

``amax_window`` is the largest amax of the clean steps of the current interval (since the scale
last changed or growth was last refused), so growth needs ``growth_interval`` clean steps in a row
that all left the headroom: one quiet step among noisy ones cannot let the scale grow into the
next overflow, and the large gradients of early training stop blocking growth one interval after
they are gone. A growth goes as far as the interval's peak allows in one move (the power of two
that keeps ``amax_margin`` of headroom above it), so the scale comes back within one interval
after a backoff caused by a one-off spike, and follows gradients that shrink faster than
``growth_factor`` per interval. A window of exact zeros says nothing about the headroom: the
growth is then ``growth_factor``, as torch's.

(``pow2_floor``: the largest power of two not above, read off the float64 exponent bits, so the
rule stays exact and the fused kernel computes the same bits.)

With ``hysteresis=1`` and no bounds this is ``torch._amp_update_scale_`` step for step: products
are taken in float64 and rounded once to float32, as torch's kernels do. The last two counters
only feed ``tolerance``; they are kept (and checkpointed) whatever the settings, and a backoff
refused by ``min_scale_rule="refuse"`` resets them as fairseq does before it raises.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch

from distscale import fields
from distscale.config import FP16_MAX, ScalerConfig
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
    calibrated: Annotated[torch.Tensor, Field(torch.int32, 0, since=4)]
    """1 once the "amax" rule has set the scale from a measured amax (0 before; unused by "torch")."""
    amax_window: Annotated[torch.Tensor, Field(torch.float32, 0.0, since=4)]
    """The largest amax of the current growth interval's clean steps (since the scale last changed
    or a growth was refused; "amax" rule; 0 otherwise)."""

    def to(self, device: torch.device | str) -> ScaleState:
        return ScaleState(*(t.to(device) for t in self))


STATE_DTYPES = fields.dtypes(ScaleState)


def init_state(config: ScalerConfig, device: torch.device | str = "cpu") -> ScaleState:
    """Fresh state: ``init_scale``, trackers at rest, counters at zero."""
    return fields.allocate(ScaleState, config, device)


def _times(scale: torch.Tensor, factor: float) -> torch.Tensor:
    # float64 product rounded once to float32: what torch's update kernels compute.
    return (scale.double() * factor).float()


EXPONENT_BITS = 0x7FF0000000000000  # of a float64: masking the mantissa away floors to a power of two
_POW2_RANGE = (2.0**-126, 2.0**127)  # float32's normal powers of two


def pow2_floor(x: torch.Tensor) -> torch.Tensor:
    """The largest power of two not above each positive, finite float64 ``x`` (bits, not log2)."""
    return torch.bitwise_and(x.view(torch.int64), EXPONENT_BITS).view(torch.float64)


def update(
    state: ScaleState,
    found_inf: torch.Tensor,
    config: ScalerConfig,
    amax: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> ScaleState:
    """Apply one step of the rule. ``found_inf``: 0-dim float, > 0 when any gradient overflowed.
    ``amax``: the step's largest |scaled gradient| (0-dim; the "amax" rule only; None: not measured).
    ``held``: 0-dim bool, the step was skipped by a skip rule or a suspected fault (see
    :mod:`distscale.rules`; never with ``found_inf``): the state is kept, only ``num_updates`` advances.

    Pure: returns new tensors, never syncs. The caller guarantees that ``found_inf`` and ``amax``
    are job-wide values (already reduced across ranks), so all ranks stay identical.
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
    growth_due = ~found & (successful >= config.growth_interval)
    do_growth = growth_due
    calibrated = state.calibrated.clone()  # new tensors only: the caller copies them in place
    amax_window = state.amax_window.clone()
    if config.rule == "amax":
        headroom, calibrate, fitted, peak = _amax_rule(state, found, amax, config, min_scale, max_scale)
        do_growth = growth_due & headroom & ~calibrate
        refused = growth_due & ~headroom & ~calibrate  # a new interval, a new window
        calibrated = torch.where(calibrate, 1, calibrated)
    grown = _times(scale, config.growth_factor)
    grown_ok = do_growth & torch.isfinite(grown)

    new_scale = torch.where(
        apply_backoff, backed_off, torch.where(grown_ok, torch.clamp(grown, max=max_scale), scale)
    )
    if config.rule == "amax":
        # The max: fitted rounds down to a power of two, below grown for some scales and factors.
        jump = torch.where(peak > 0, torch.maximum(torch.clamp(grown, max=max_scale), fitted), new_scale)
        new_scale = torch.where(calibrate, fitted, torch.where(grown_ok, jump, new_scale))
        do_growth = do_growth | calibrate  # the tracker restarts, the hysteresis refills
        amax_window = torch.where((new_scale != scale) | refused, 0.0, peak)
        restart = do_growth | refused
    else:
        restart = do_growth
    # Python scalars in torch.where keep the tensor's dtype and cost no extra kernel.
    if config.growth_delay == 0:
        new_growth_tracker = torch.where(found | restart, 0, successful)
    else:
        new_growth_tracker = torch.where(found, -config.growth_delay, torch.where(restart, 0, successful))
    refill = do_growth if config.hysteresis_refill == "growth" else ~found
    new_hysteresis = torch.where(
        found,
        torch.clamp(hysteresis_tracker - 1, min=0),
        torch.where(refill, config.hysteresis, hysteresis_tracker),
    )
    steps, overflows = state.steps_since_rescale, state.overflows_since_backoff
    new = ScaleState(
        scale=new_scale,
        growth_tracker=new_growth_tracker,
        hysteresis_tracker=new_hysteresis,
        num_updates=state.num_updates + 1,
        num_skipped=state.num_skipped + found.to(state.num_skipped.dtype),
        num_min_scale_events=state.num_min_scale_events + min_event.to(torch.int64),
        steps_since_rescale=torch.where(do_backoff | do_growth, 0, steps + 1),
        overflows_since_backoff=torch.where(do_backoff, 0, overflows + found.to(overflows.dtype)),
        calibrated=calibrated,
        amax_window=amax_window,
    )
    if held is None:
        return new
    held = held.to(scale.device)
    kept = ScaleState(*(torch.where(held, old, value) for old, value in zip(state, new, strict=True)))
    return kept._replace(num_updates=new.num_updates)


def _amax_rule(
    state: ScaleState,
    found: torch.Tensor,
    amax: torch.Tensor | None,
    config: ScalerConfig,
    min_scale: float,
    max_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (growth would leave the headroom, calibrate now, the fitted scale, the window's new peak).
    device = state.scale.device
    if amax is None:  # not measured: no calibration, no growth, the window as it was
        never = torch.zeros((), dtype=torch.bool, device=device)
        return never, never, state.scale, state.amax_window
    a = amax.to(device=device, dtype=torch.float64)
    measured = ~found & torch.isfinite(a)
    # float32 values, so the max is exact and the window stores it unrounded.
    peak = torch.where(measured, torch.maximum(state.amax_window, a.float()), state.amax_window)
    headroom = measured & (peak.double() * (config.growth_factor * config.amax_margin) <= FP16_MAX)
    calibrate = measured & (a > 0) & (state.calibrated == 0)
    # Headroom of margin above the window's largest scaled gradient: a power of two, within
    # float32's range (a zero peak gives inf, clamped; it is never used, see update()).
    target = state.scale.double() * FP16_MAX / (peak.double() * config.amax_margin)
    pow2 = pow2_floor(torch.clamp(torch.nan_to_num(target, nan=1.0), *_POW2_RANGE)).float()
    return headroom, calibrate, torch.clamp(pow2, min=min_scale, max=max_scale), peak
