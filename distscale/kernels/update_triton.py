"""The scaling rule and the metrics in one Triton launch: what ``update()`` costs on a GPU.

:func:`distscale.policy.update` and :func:`distscale.stats.update_stats` are the specification:
pure ``torch.where`` code that runs anywhere, but as ~40 tiny kernels on a GPU. This module
computes the same values in one single-program kernel that reads and writes the 0-dim state and
stats tensors in place, bit for bit (tested against the torch rule in Triton's interpreter over
random sequences and every rule variant). Products of the scale are taken in float64 and rounded
once to float32, comparisons with ``min_scale``/``max_scale`` in float32, as the torch rule does.

No host sync, no allocation after the first call with a config (the float64 constants are
cached per device), so it can be captured in a CUDA graph once it has run eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distscale.config import ScalerConfig

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover
    raise ImportError('distscale\'s fused update needs Triton: pip install "distscale[triton]"') from exc

__all__ = ["update_"]


@triton.jit
def _update_kernel(
    # state (read and written in place)
    scale_ptr, growth_ptr, hyst_ptr, updates_ptr, skipped_ptr, min_events_ptr, since_rescale_ptr,
    overflows_since_ptr, calibrated_ptr, amax_window_ptr,
    # stats (read and written in place)
    ovf_ptr, consec_ptr, max_consec_ptr, since_ovf_ptr, at_min_ptr, was_skipped_ptr, norm_out_ptr,
    zero_out_ptr, under_out_ptr, amax_out_ptr, headroom_out_ptr, change_out_ptr,
    # this step
    found_ptr, step_ovf_ptr, norm_in_ptr, zero_in_ptr, under_in_ptr, amax_in_ptr,
    consts_ptr,  # float64: growth_factor, backoff_factor, tolerance, min_scale, max_scale, amax_margin
    GROWTH_INTERVAL: tl.constexpr, HYSTERESIS: tl.constexpr, GROWTH_DELAY: tl.constexpr,
    REFILL_ON_GROWTH: tl.constexpr, HAS_TOLERANCE: tl.constexpr, HAS_MIN: tl.constexpr,
    MIN_FLOOR: tl.constexpr, HAS_MAX: tl.constexpr, HAS_NORM: tl.constexpr, HAS_UNDERFLOW: tl.constexpr,
    HAS_STEP_OVF: tl.constexpr, HAS_AMAX: tl.constexpr, AMAX_RULE: tl.constexpr,
):  # fmt: skip
    growth_factor = tl.load(consts_ptr)
    backoff_factor = tl.load(consts_ptr + 1)
    tolerance = tl.load(consts_ptr + 2)
    min_scale = tl.load(consts_ptr + 3).to(tl.float32)  # exactly representable: rounded on the host
    max_scale = tl.load(consts_ptr + 4).to(tl.float32)
    amax_margin = tl.load(consts_ptr + 5)

    scale = tl.load(scale_ptr)
    growth = tl.load(growth_ptr)
    hyst = tl.load(hyst_ptr)
    steps = tl.load(since_rescale_ptr)
    overflows = tl.load(overflows_since_ptr)
    found = tl.load(found_ptr) > 0

    # The rule: see distscale.policy for the specification this mirrors line by line.
    do_backoff = found & (hyst <= 1)
    if HAS_TOLERANCE:
        ratio = (overflows + 1).to(tl.float64) / (steps + 1).to(tl.float64)
        do_backoff = do_backoff & (ratio >= tolerance)
    backed_off = (scale.to(tl.float64) * backoff_factor).to(tl.float32)
    if HAS_MIN:
        if MIN_FLOOR:
            min_event = do_backoff & (scale <= min_scale)
            apply_backoff = do_backoff
            backed_off = tl.maximum(backed_off, min_scale)
        else:
            min_event = found & (tl.where(do_backoff, backed_off, scale) <= min_scale)
            apply_backoff = do_backoff & (min_event == 0)
    else:
        min_event = found & (found == 0)  # never
        apply_backoff = do_backoff

    successful = growth + 1
    growth_due = (found == 0) & (successful >= GROWTH_INTERVAL)
    do_growth = growth_due
    refused = found & (found == 0)  # never, unless the amax rule refuses a due growth
    calibrated = tl.load(calibrated_ptr)
    window = tl.load(amax_window_ptr)
    amax = tl.load(amax_in_ptr)  # without HAS_AMAX, found's value: read, never used
    calibrate = found & (found == 0)  # never, unless the amax rule says so
    fitted = scale
    peak = window
    if AMAX_RULE:
        if HAS_AMAX:
            a = amax.to(tl.float64)
            measured = (found == 0) & (a == a) & (tl.abs(a) < float("inf"))
            calibrate = measured & (a > 0) & (calibrated == 0)
            peak = tl.where(measured, tl.maximum(window, amax), window)
            headroom = measured & (peak.to(tl.float64) * (growth_factor * amax_margin) <= _FP16_MAX)
            do_growth = growth_due & headroom & (calibrate == 0)
            refused = growth_due & (headroom == 0) & (calibrate == 0)
            # The power of two below scale * FP16_MAX / (peak * margin): its exponent bits, within
            # float32's normal powers of two (as distscale.policy.pow2_floor).
            target = scale.to(tl.float64) * _FP16_MAX / (peak.to(tl.float64) * amax_margin)
            target = tl.where(target == target, target, 1.0)
            target = tl.minimum(tl.maximum(target, _POW2_MIN), _POW2_MAX)
            pow2 = (target.to(tl.int64, bitcast=True) & _EXPONENT_BITS).to(tl.float64, bitcast=True)
            fitted = pow2.to(tl.float32)
            if HAS_MIN:
                fitted = tl.maximum(fitted, min_scale)
            if HAS_MAX:
                fitted = tl.minimum(fitted, max_scale)
        else:  # amax not measured: never grow
            do_growth = growth_due & (found & (found == 0))
            refused = growth_due
    grown = (scale.to(tl.float64) * growth_factor).to(tl.float32)
    grown_ok = do_growth & (grown == grown) & (tl.abs(grown) < float("inf"))
    if HAS_MAX:
        grown = tl.minimum(grown, max_scale)
    if AMAX_RULE:  # as far as the window allows (a window of zeros: growth_factor)
        grown = tl.where(peak > 0, tl.maximum(grown, fitted), grown)
    new_scale = tl.where(apply_backoff, backed_off, tl.where(grown_ok, grown, scale))
    new_scale = tl.where(calibrate, fitted, new_scale)
    do_growth = do_growth | calibrate  # the tracker restarts, the hysteresis refills
    restart = do_growth | refused  # a refused growth starts a new interval
    if GROWTH_DELAY == 0:
        new_growth = tl.where(found | restart, 0, successful)
    else:
        new_growth = tl.where(found, -GROWTH_DELAY, tl.where(restart, 0, successful))
    if REFILL_ON_GROWTH:
        refill = do_growth
    else:
        refill = found == 0
    new_hyst = tl.where(found, tl.maximum(hyst - 1, 0), tl.where(refill, HYSTERESIS, hyst))
    found64 = found.to(tl.int64)
    tl.store(scale_ptr, new_scale)
    tl.store(growth_ptr, new_growth.to(tl.int32))
    tl.store(hyst_ptr, new_hyst.to(tl.int32))
    tl.store(updates_ptr, tl.load(updates_ptr) + 1)
    tl.store(skipped_ptr, tl.load(skipped_ptr) + found64)
    tl.store(min_events_ptr, tl.load(min_events_ptr) + min_event.to(tl.int64))
    tl.store(since_rescale_ptr, tl.where(do_backoff | do_growth, 0, steps + 1))
    tl.store(overflows_since_ptr, tl.where(do_backoff, 0, overflows + found64))
    tl.store(calibrated_ptr, tl.where(calibrate, 1, calibrated).to(tl.int32))
    if AMAX_RULE:
        tl.store(amax_window_ptr, tl.where((new_scale != scale) | refused, 0.0, peak))

    # The metrics: see distscale.stats.update_stats.
    if HAS_STEP_OVF:
        step_ovf = tl.load(step_ovf_ptr)
    else:
        step_ovf = found64
    tl.store(ovf_ptr, tl.load(ovf_ptr) + step_ovf)
    consecutive = tl.where(found, tl.load(consec_ptr) + 1, 0)
    tl.store(consec_ptr, consecutive)
    tl.store(max_consec_ptr, tl.maximum(tl.load(max_consec_ptr), consecutive))
    tl.store(since_ovf_ptr, tl.where(found, 0, tl.load(since_ovf_ptr) + 1))
    if HAS_MIN:
        tl.store(at_min_ptr, tl.load(at_min_ptr) + (new_scale <= min_scale).to(tl.int64))
    tl.store(was_skipped_ptr, found)
    if HAS_NORM:
        tl.store(norm_out_ptr, tl.load(norm_in_ptr))
    else:
        tl.store(norm_out_ptr, float("nan"))
    if HAS_UNDERFLOW:
        tl.store(zero_out_ptr, tl.load(zero_in_ptr).to(tl.float32))
        tl.store(under_out_ptr, tl.load(under_in_ptr).to(tl.float32))
    # amax and its headroom (see distscale.stats.headroom_log2): NaN on skipped or unmeasured steps.
    amax32 = tl.where(found, float("nan"), amax.to(tl.float32))
    if HAS_AMAX:
        ratio = _FP16_MAX / amax32.to(tl.float64)
        exponent = ((ratio.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        headroom = tl.where(amax32 == 0, float("inf"), exponent.to(tl.float32))
        headroom = tl.where(amax32 != amax32, float("nan"), headroom)
        tl.store(amax_out_ptr, amax32)
        tl.store(headroom_out_ptr, headroom)
    else:
        tl.store(amax_out_ptr, float("nan"))
        tl.store(headroom_out_ptr, float("nan"))
    change = tl.where(new_scale > scale, 1, tl.where(new_scale < scale, 2, tl.where(min_event, 4, 0)))
    tl.store(change_out_ptr, tl.where(calibrate, 3, change).to(tl.int64))


_CONSTS: dict[tuple[torch.device, ScalerConfig], torch.Tensor] = {}
# Globals a kernel reads must be constexpr.
_FP16_MAX = tl.constexpr(65504.0)
_POW2_MIN = tl.constexpr(2.0**-126)
_POW2_MAX = tl.constexpr(2.0**127)
_EXPONENT_BITS = tl.constexpr(0x7FF0000000000000)


def _f32(value: float) -> float:
    # The float32 value torch's comparisons and clamps use for a Python float bound.
    return float(torch.tensor(value, dtype=torch.float32))


def _consts(config: ScalerConfig, device: torch.device) -> torch.Tensor:
    key = (device, config)
    if key not in _CONSTS:
        values = [
            config.growth_factor,
            config.backoff_factor,
            config.tolerance,
            _f32(config.min_scale) if config.min_scale is not None else 0.0,
            _f32(config.max_scale) if config.max_scale is not None else 0.0,
            config.amax_margin,
        ]
        _CONSTS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _CONSTS[key]


def update_(
    state: Sequence[torch.Tensor],
    stats: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    config: ScalerConfig,
    *,
    overflows: torch.Tensor | None = None,
    grad_norm: torch.Tensor | None = None,
    underflow: tuple[torch.Tensor, torch.Tensor] | None = None,
    amax: torch.Tensor | None = None,
) -> None:
    """``policy.update`` then ``stats.update_stats``, in place, in one launch. No host sync.

    ``state``, ``stats``: a ``ScaleState`` and a ``ScalerStats`` (their tensors, in declaration
    order: the kernel's pointer list mirrors it). Inputs on another device are moved to the state's
    (no-ops in the scaler: they are already there).
    """
    device = state[0].device
    found = found_inf.to(device).reshape(()).float()
    norm = grad_norm.to(device).reshape(()).float() if grad_norm is not None else found
    zero, under = (u.to(device).reshape(()) for u in underflow) if underflow is not None else (found, found)
    # Unread without HAS_STEP_OVF: any int64 pointer will do.
    step_ovf = overflows.to(device).reshape(()).to(torch.int64) if overflows is not None else state[3]
    amax_in = amax.to(device).reshape(()).float() if amax is not None else found
    _update_kernel[(1,)](
        *state,
        *stats,
        found,
        step_ovf,
        norm,
        zero,
        under,
        amax_in,
        _consts(config, device),
        GROWTH_INTERVAL=config.growth_interval,
        HYSTERESIS=config.hysteresis,
        GROWTH_DELAY=config.growth_delay,
        REFILL_ON_GROWTH=config.hysteresis_refill == "growth",
        HAS_TOLERANCE=config.tolerance > 0,
        HAS_MIN=config.min_scale is not None,
        MIN_FLOOR=config.min_scale_rule == "floor",
        HAS_MAX=config.max_scale is not None,
        HAS_NORM=grad_norm is not None,
        HAS_UNDERFLOW=underflow is not None,
        HAS_STEP_OVF=overflows is not None,
        HAS_AMAX=amax is not None,
        AMAX_RULE=config.rule == "amax",
    )
