"""DeepSpeed's, Megatron-core's and fairseq's loss-scaling rules as ``GradScaler`` settings.

Pure functions of plain arguments: each returns the keyword arguments of
:class:`distscale.GradScaler` that make its scale follow the peer's rule, update for update, for
any sequence of overflows. ``GradScaler.from_deepspeed_config``, ``from_megatron`` and
``from_fairseq`` apply them (keyword overrides win). No torch, no host sync.

What each rule does, in distscale's terms (:mod:`distscale.policy`):

=================== ============================= ===================== ===========================
                    DeepSpeed ZeRO                Megatron-core         fairseq
=================== ============================= ===================== ===========================
growth / backoff    x2 / x0.5 (fixed)             x2 / x0.5 (factory)   x f / / f (``scale_factor``)
first growth        after window + 1 clean steps  after window          after window
                    (``growth_delay=1``), then
                    every window
overflow tolerance  ``hysteresis`` overflows      ``hysteresis``        ``tolerance`` (fraction of
                                                  overflows             steps since last rescale)
hysteresis refill   at growth, or every clean     at growth only
                    step (``consecutive``)        (cumulative)
minimum             raise when an overflow finds  clamp, keep skipping  raise when an overflow would
                    the scale at the minimum                            bring the scale to or below
                                                                        it (the scale is kept)
=================== ============================= ===================== ===========================

Differences that remain, by design: the scale is a float32 tensor (the peers keep a Python float,
Megatron a float32 tensor), so non-dyadic values round to float32, and growth stops at the
largest finite float32 instead of reaching inf (DeepSpeed, fairseq: 2**1024; Megatron: inf).
Factors other than powers of two may round differently by one float32 ulp.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["DEEPSPEED_FP16_KEYS", "deepspeed", "fairseq", "megatron"]

DEEPSPEED_FP16_KEYS = frozenset(
    {
        "enabled",
        "auto_cast",
        "loss_scale",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "consecutive_hysteresis",
        "min_loss_scale",
        "fp16_master_weights_and_grads",
    }
)
# DeepSpeed's defaults (runtime/precision_config.py, DeepSpeedFP16Config).
_DS_DEFAULTS: dict[str, Any] = {
    "enabled": True,  # the caller asks for a scaler; DeepSpeed's own default is False
    "auto_cast": False,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "consecutive_hysteresis": False,
    "min_loss_scale": 1,
    "fp16_master_weights_and_grads": False,
}


def _bad(key: str, constraint: str, value: object, hint: str = "") -> ValueError:
    return ValueError(f"{key} must be {constraint}, got {value!r}." + (f" HINT: {hint}" if hint else ""))


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, "a bool", value)
    return value


def _int(key: str, value: object, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    # Integers, or floats with an integral value (JSON writers emit 1000.0); never bools.
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise _bad(key, "an integer", value, hint)
    number = int(value)  # type: ignore[call-overload]
    if (low is not None and number < low) or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _bad(key, f"an integer {bound}", value, hint)
    return number


def _number(key: str, value: object, *, positive: bool = True, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _bad(key, "a finite number", value)
    number = float(value)
    if positive and not (number > 0 or (allow_zero and number == 0)):
        raise _bad(key, ">= 0" if allow_zero else "> 0", value)
    return number


def deepspeed(config: Mapping[str, Any]) -> dict[str, Any]:
    """GradScaler arguments reproducing DeepSpeed's fp16 loss scaling (ZeRO stages 1-3).

    ``config``: a whole DeepSpeed config (its ``"fp16"`` section is read, other sections are
    ignored) or the ``"fp16"`` section itself. Keys: ``loss_scale`` (0: dynamic, > 0: static),
    ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``consecutive_hysteresis``,
    ``min_loss_scale``; ``enabled`` (False gives a disabled scaler); ``auto_cast`` and
    ``fp16_master_weights_and_grads`` are accepted and ignored (they do not touch the scale).
    Missing keys take DeepSpeed's defaults. Unknown keys and invalid values raise ``ValueError``
    naming them.

    Dynamic scaling follows ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`` exactly:
    start at ``2**initial_scale_power``; an overflow spends one unit of ``hysteresis``
    (``delayed_shift``) and halves the scale once none is left; a growth (x2) refills the units,
    or every clean step does with ``consecutive_hysteresis``. Growth counts iterations since the
    last overflow, hysteresis-only overflows included, and DeepSpeed grows when that count minus
    one is a positive multiple of ``loss_scale_window``: the first growth after an overflow (or
    the start) comes after ``window + 1`` clean steps, the next ones every ``window``
    (``growth_delay=1``). An overflow that finds the scale at ``min_loss_scale`` raises, as ZeRO's
    ``raise_error_at_min_scale=True`` (``MinScaleError``; override ``on_min_scale="clamp"`` for
    ``raise_error_at_min_scale=False``). Static scaling keeps the scale at ``loss_scale`` and
    still skips overflowing steps. DeepSpeed's non-ZeRO ``FP16_Optimizer`` has no hysteresis and
    clamps: override ``hysteresis=1, on_min_scale="clamp"`` for it.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"DeepSpeed config must be a mapping, got {type(config).__name__}.")
    section: Mapping[str, Any] = config
    where = "fp16"
    if "fp16" in config:
        section = config["fp16"]
        if not isinstance(section, Mapping):
            raise _bad("DeepSpeed config['fp16']", "a mapping", section)
    unknown = sorted(set(section) - DEEPSPEED_FP16_KEYS, key=str)
    if unknown:
        raise ValueError(
            f"Unknown DeepSpeed fp16 key(s) {unknown}; known: {sorted(DEEPSPEED_FP16_KEYS)}. "
            "HINT: pass the whole DeepSpeed config (with its 'fp16' section) or the 'fp16' section; "
            "'auto' values must be resolved before (as the HF Trainer does)."
        )
    cfg = {**_DS_DEFAULTS, **section}
    for key in ("enabled", "auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads"):
        _bool(f"{where}.{key}", cfg[key])
    loss_scale = _number(f"{where}.loss_scale", cfg["loss_scale"], allow_zero=True)
    power = _int(
        f"{where}.initial_scale_power", cfg["initial_scale_power"], -126, 127, "2**power must be a float32"
    )
    window = _int(f"{where}.loss_scale_window", cfg["loss_scale_window"])
    hysteresis = _int(
        f"{where}.hysteresis",
        cfg["hysteresis"],
        1,
        hint="DeepSpeed never backs off with hysteresis < 1 (its counter only decreases); use 1 to "
        "back off on every overflow.",
    )
    min_loss_scale = _int(
        f"{where}.min_loss_scale",
        cfg["min_loss_scale"],
        hint="DeepSpeed declares it an int; for another floor pass min_scale=... as an override.",
    )
    enabled = cfg["enabled"]
    if loss_scale > 0:  # static: DeepSpeed's LossScaler never changes the scale
        return {
            "enabled": enabled,
            "init_scale": loss_scale,
            "min_scale": loss_scale,
            "max_scale": loss_scale,
            "on_min_scale": "clamp",
        }
    # DeepSpeed validates these only for dynamic scaling.
    if window < 1:
        raise _bad(
            f"{where}.loss_scale_window", "an integer >= 1 with dynamic scaling (loss_scale=0)", window
        )
    if min_loss_scale <= 0:
        raise _bad(f"{where}.min_loss_scale", "> 0 with dynamic scaling (loss_scale=0)", min_loss_scale)
    if min_loss_scale > 2.0**power:
        raise ValueError(
            f"{where}.min_loss_scale={min_loss_scale} exceeds the initial scale "
            f"2**initial_scale_power = {2.0**power}: the scale must start at or above its minimum."
        )
    return {
        "enabled": enabled,
        "init_scale": 2.0**power,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": window,
        "hysteresis": hysteresis,
        "hysteresis_refill": "clean_step" if cfg["consecutive_hysteresis"] else "growth",
        "min_scale": float(min_loss_scale),
        "on_min_scale": "raise",
        "min_scale_rule": "floor",
        "growth_delay": 1,
    }


def megatron(
    *,
    loss_scale: float | None = None,
    initial_loss_scale: float = 2.0**32,
    min_loss_scale: float = 1.0,
    loss_scale_window: int = 1000,
    hysteresis: int = 2,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
) -> dict[str, Any]:
    """GradScaler arguments reproducing Megatron-core's grad scalers.

    Arguments and defaults are ``megatron.core.optimizer.OptimizerConfig``'s (``loss_scale``,
    ``initial_loss_scale``, ``min_loss_scale``, ``loss_scale_window``, ``hysteresis``) plus
    ``DynamicGradScaler``'s factors, which Megatron's optimizer factory fixes at 2.0 / 0.5.
    ``loss_scale`` set and not 0 (Megatron tests its truth): ``ConstantGradScaler`` (the scale
    never changes; overflowing steps are still skipped). Otherwise ``DynamicGradScaler``: an overflow resets the growth count and
    spends one unit of ``hysteresis``; once none is left every overflow multiplies the scale by
    ``backoff_factor``, clamped at ``min_loss_scale`` (no error: training keeps skipping). Only a
    growth (after ``loss_scale_window`` consecutive clean steps) refills the hysteresis, so the
    overflows it counts are cumulative since the last growth, not consecutive as Megatron's
    docstring says.
    """
    if loss_scale:
        scale = _number("loss_scale", loss_scale)
        return {"init_scale": scale, "min_scale": scale, "max_scale": scale, "on_min_scale": "clamp"}
    return {
        "init_scale": initial_loss_scale,
        "growth_factor": growth_factor,
        "backoff_factor": backoff_factor,
        "growth_interval": loss_scale_window,
        "hysteresis": hysteresis,
        "hysteresis_refill": "growth",
        "min_scale": min_loss_scale,
        "on_min_scale": "clamp",
        "min_scale_rule": "floor",
        "growth_delay": 0,
    }


def fairseq_scale_window(data_parallel_size: int = 1, update_freq: int = 1) -> int:
    """fairseq-train's default ``--fp16-scale-window``: ``int(2**14 / data_parallel_size / update_freq)``."""
    dp = _int("data_parallel_size", data_parallel_size, 1)
    freq = _int("update_freq", update_freq, 1)
    window = int(2**14 / dp / freq)
    if window < 1:
        raise ValueError(
            f"fairseq's default scale window int(2**14 / {dp} / {freq}) is 0. HINT: pass scale_window."
        )
    return window


def fairseq(
    *,
    init_scale: float = 128.0,
    scale_factor: float = 2.0,
    scale_window: int | None = None,
    tolerance: float = 0.0,
    threshold: float | None = None,
    min_loss_scale: float = 1e-4,
    data_parallel_size: int = 1,
    update_freq: int = 1,
) -> dict[str, Any]:
    """GradScaler arguments reproducing fairseq's ``DynamicLossScaler`` as fairseq-train uses it.

    Defaults are fairseq-train's: ``--fp16-init-scale`` 128 (the class's own default is 2**15),
    ``--fp16-scale-window`` ``int(2**14 / data_parallel_size / update_freq)`` (the class's is
    2000; ``data_parallel_size`` is fairseq's world size / model-parallel size),
    ``--fp16-scale-tolerance`` 0, ``--threshold-loss-scale`` None, ``--min-loss-scale`` 1e-4.

    The rule: every step, overflow or not, is one iteration. A clean step multiplies the scale by
    ``scale_factor`` when the iterations since the last overflow are a multiple of
    ``scale_window`` (torch's timing). An overflow counts toward the overflows since the last
    decrease; if they make up at least ``tolerance`` of the iterations since the last rescale
    (decrease or growth, this one included), the scale is divided by ``scale_factor``, floored at
    ``threshold``. If the scale then is ``<= min_loss_scale``, fairseq restores it and raises
    ``FloatingPointError``; distscale keeps it and raises ``MinScaleError`` (``on_min_scale``).
    A ``threshold`` above ``min_loss_scale`` makes that unreachable (the scale is clamped at
    ``threshold``, silently); one at or below it never changes a scale fairseq keeps.
    """
    window = fairseq_scale_window(data_parallel_size, update_freq) if scale_window is None else scale_window
    factor = _number("scale_factor", scale_factor)
    if factor <= 1.0:
        raise _bad("scale_factor", "> 1", scale_factor)
    floor = _number("min_loss_scale", min_loss_scale)
    common = {
        "init_scale": init_scale,
        "growth_factor": factor,
        "backoff_factor": 1.0 / factor,
        "growth_interval": window,
        "hysteresis": 1,
        "tolerance": tolerance,
        "growth_delay": 0,
    }
    if threshold is not None and _number("threshold", threshold) > floor:
        if _number("init_scale", init_scale) < threshold:
            raise ValueError(
                f"init_scale={init_scale!r} is below threshold={threshold!r}: fairseq would raise the scale "
                "to the threshold at the first overflow; distscale never raises the scale on an overflow."
            )
        return {**common, "min_scale": float(threshold), "on_min_scale": "clamp", "min_scale_rule": "floor"}
    return {**common, "min_scale": floor, "on_min_scale": "raise", "min_scale_rule": "refuse"}
