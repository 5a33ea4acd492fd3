"""Scaler settings: one frozen dataclass, validated once, shared by the policy and the façade.

The defaults are torch.amp.GradScaler's, so ``ScalerConfig()`` reproduces torch's rule bit for bit.
Every bad value raises ``ValueError``/``TypeError`` naming the argument, the constraint and the
value, so a typo in a launch config fails at construction rather than a thousand steps later.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Literal

OnMinScale = Literal["clamp", "raise", "warn"]
ON_MIN_SCALE_CHOICES: tuple[str, ...] = ("clamp", "raise", "warn")
HysteresisRefill = Literal["growth", "clean_step"]
HYSTERESIS_REFILL_CHOICES: tuple[str, ...] = ("growth", "clean_step")


def _require_number(name: str, value: object) -> float:
    # bool is an int subclass; True as a growth factor is a bug, not a 1.0. numpy scalars pass.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    return float(value)


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    return int(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalerConfig:
    """The dynamic loss-scaling rule (pseudo-code in :mod:`distscale.policy`)."""

    init_scale: float = 2.0**16
    """Scale before the first update. Finite and > 0."""
    growth_factor: float = 2.0
    """Multiplier applied after ``growth_interval`` consecutive clean steps. > 1."""
    backoff_factor: float = 0.5
    """Multiplier applied when an overflow exhausts the hysteresis. In (0, 1)."""
    growth_interval: int = 2000
    """Consecutive clean steps before the scale grows. >= 1."""
    hysteresis: int = 1
    """Overflows tolerated before a backoff; 1 backs off on every overflow (torch's rule).
    Every overflow spends one unit; a refill (see ``hysteresis_refill``) restores all of them."""
    hysteresis_refill: HysteresisRefill = "growth"
    """When spent hysteresis is restored: "growth" (at each growth of the scale: DeepSpeed's
    default and Megatron's rule) or "clean_step" (after every step without overflow:
    DeepSpeed's ``consecutive_hysteresis``, NeMo)."""
    min_scale: float | None = None
    """Floor for backoffs (None: no floor, as torch). Finite and > 0 when set."""
    max_scale: float | None = None
    """Ceiling for growth (None: no ceiling). The scale never grows to inf either way."""
    on_min_scale: OnMinScale = "clamp"
    """What an overflow at the floor does: "clamp" (stay at ``min_scale``, keep skipping),
    "warn" (also ``warnings.warn``) or "raise" (``MinScaleError`` on every rank)."""

    def __post_init__(self) -> None:
        init_scale = _require_number("init_scale", self.init_scale)
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be finite and > 0, got {self.init_scale!r}.")
        growth = _require_number("growth_factor", self.growth_factor)
        if not (math.isfinite(growth) and growth > 1.0):
            raise ValueError(
                f"growth_factor must be finite and > 1.0, got {self.growth_factor!r}. "
                "HINT: use growth_interval to slow growth down."
            )
        backoff = _require_number("backoff_factor", self.backoff_factor)
        if not 0.0 < backoff < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor!r}.")
        if _require_int("growth_interval", self.growth_interval) < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval!r}.")
        if _require_int("hysteresis", self.hysteresis) < 1:
            raise ValueError(
                f"hysteresis must be >= 1, got {self.hysteresis!r}. "
                "HINT: hysteresis=1 backs off on every overflow, as torch does."
            )
        if self.hysteresis_refill not in HYSTERESIS_REFILL_CHOICES:
            raise ValueError(
                f"hysteresis_refill must be one of {HYSTERESIS_REFILL_CHOICES}, "
                f"got {self.hysteresis_refill!r}."
            )
        for name in ("min_scale", "max_scale"):
            value = getattr(self, name)
            if value is not None:
                number = _require_number(name, value)
                if not (math.isfinite(number) and number > 0):
                    raise ValueError(f"{name} must be None or finite and > 0, got {value!r}.")
        if self.min_scale is not None and self.max_scale is not None and self.min_scale > self.max_scale:
            raise ValueError(
                f"min_scale must be <= max_scale, got min_scale={self.min_scale!r} > "
                f"max_scale={self.max_scale!r}."
            )
        low = 0.0 if self.min_scale is None else self.min_scale
        high = math.inf if self.max_scale is None else self.max_scale
        if not low <= init_scale <= high:
            raise ValueError(
                f"init_scale must be within [min_scale, max_scale] = [{low}, {high}], "
                f"got {self.init_scale!r}."
            )
        if self.on_min_scale not in ON_MIN_SCALE_CHOICES:
            raise ValueError(
                f"on_min_scale must be one of {ON_MIN_SCALE_CHOICES}, got {self.on_min_scale!r}."
            )

        # Store plain Python numbers (numpy scalars would not load with weights_only=True).
        for name in ("init_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        for name in ("growth_interval", "hysteresis"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def contains(self, scale: float) -> bool:
        """Whether ``scale`` lies within [min_scale, max_scale]."""
        return (self.min_scale is None or scale >= self.min_scale) and (
            self.max_scale is None or scale <= self.max_scale
        )

    def to_dict(self) -> dict[str, object]:
        """Plain-number form for ``state_dict`` (None bounds stay None)."""
        return asdict(self)
