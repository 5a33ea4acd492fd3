"""Scaler settings: one frozen dataclass, validated once, shared by the policy and the façade.

The defaults are torch.amp.GradScaler's, so ``ScalerConfig()`` reproduces torch's rule bit for bit.
Every bad value raises ``ValueError``/``TypeError`` naming the argument, the constraint and the
value, so a typo in a launch config fails at construction rather than a thousand steps later.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal

OnMinScale = Literal["clamp", "raise", "warn"]
ON_MIN_SCALE_CHOICES: tuple[str, ...] = ("clamp", "raise", "warn")
HysteresisRefill = Literal["growth", "clean_step"]
HYSTERESIS_REFILL_CHOICES: tuple[str, ...] = ("growth", "clean_step")
MinScaleRule = Literal["floor", "refuse"]
MIN_SCALE_RULE_CHOICES: tuple[str, ...] = ("floor", "refuse")
Rule = Literal["torch", "amax"]
RULE_CHOICES: tuple[str, ...] = ("torch", "amax")
OnFault = Literal["warn", "raise", "skip"]
ON_FAULT_CHOICES: tuple[str, ...] = ("warn", "raise", "skip")
SPIKE_THRESHOLDS: tuple[str, ...] = (
    "skip_grad_norm_above",
    "skip_grad_norm_sigma",
    "skip_grad_norm_ratio",
    "skip_loss_above",
    "skip_loss_sigma",
    "skip_loss_ratio",
)
"""The skip rules' thresholds (each None: that rule off); see :mod:`distscale.rules`."""
FP16_MAX = 65504.0
"""The largest finite float16: the ceiling the amax rule keeps the scaled gradients under."""


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
    """The dynamic loss-scaling rule (pseudo-code in :mod:`distscale.policy`).

    A setting's ``metadata["since"]`` is the checkpoint format version that introduced it (see
    :mod:`distscale.checkpoint`): older checkpoints lack it and load with its default."""

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
    """What a min-scale event (see ``min_scale_rule``) does: "clamp" (nothing more: keep
    skipping), "warn" (also ``warnings.warn``) or "raise" (``MinScaleError`` on every rank)."""
    min_scale_rule: MinScaleRule = field(default="floor", metadata={"since": 2})
    """How ``min_scale`` bounds a backoff. "floor": the backoff is clamped at ``min_scale``; an
    overflow that backs off from a scale already at ``min_scale`` is a min-scale event
    (torch-style floor; DeepSpeed, Megatron). "refuse": an overflow after which the scale would be
    ``<= min_scale`` keeps the previous scale and is a min-scale event (fairseq's
    ``min_loss_scale``, which raises there)."""
    growth_delay: int = field(default=0, metadata={"since": 2})
    """Extra clean steps the first growth after an overflow (or after the start) waits for: the
    growth tracker restarts at ``-growth_delay``. 0 for torch, Megatron and fairseq; 1 for
    DeepSpeed, whose window counts from the overflowing iteration. >= 0."""
    tolerance: float = field(default=0.0, metadata={"since": 2})
    """fairseq's ``tolerance``: an overflow backs off only if the overflows since the last backoff
    (this one included) make up at least this fraction of the steps since the last rescale
    (backoff or growth; this step included). 0 backs off on every overflow. Finite and >= 0;
    an alternative to ``hysteresis`` (the two cannot be combined)."""
    rule: Rule = field(default="torch", metadata={"since": 4})
    """When the scale grows. "torch": after ``growth_interval`` clean steps, blindly (torch,
    DeepSpeed, Megatron, fairseq). "amax": from the largest scaled gradient magnitude (amax) the
    check measures: the first clean step sets the scale to the largest power of two that leaves
    ``amax_margin`` of fp16 headroom; later, after ``growth_interval`` clean steps, the scale grows
    only if ``peak x growth_factor x amax_margin`` stays below fp16's maximum (``peak``: the
    largest amax of that interval; a refused growth starts a new one), and then as far as that
    peak allows. Backoffs, bounds and hysteresis as for "torch" (see :mod:`distscale.policy`)."""
    amax_margin: float = field(default=2.0**3, metadata={"since": 4})
    """The headroom the "amax" rule keeps between the largest scaled parameter gradient and fp16's
    maximum (65504), as a factor > 1. Parameter gradients are smaller than the activation
    gradients that overflow first in fp16 backward passes: the margin covers that gap. The default,
    8, trades skipped steps for scale evenly in the replay of ``bench/amax_replay.py`` (16 skips
    fewer steps and underflows more; see the README)."""

    # The skip rules (distscale.rules): which steps are skipped besides inf/NaN ones, and what a
    # suspected fault does. None: off. They decide skips, not the scale: a rule skip holds it.
    skip_grad_norm_above: float | None = field(default=None, metadata={"since": 5})
    """Skip a step whose job-wide gradient norm (unscaled; the clip's norm when the step clips,
    else the 2-norm) is above this. > 0. Acts from the first step."""
    skip_grad_norm_sigma: float | None = field(default=None, metadata={"since": 5})
    """Skip a step whose gradient norm is more than this many standard deviations above the mean
    of the last ``spike_window`` applied steps' norms. > 0."""
    skip_grad_norm_ratio: float | None = field(default=None, metadata={"since": 5})
    """Skip a step whose gradient norm is more than this times that mean. > 1."""
    skip_loss_above: float | None = field(default=None, metadata={"since": 5})
    """Skip a step whose job-wide loss (the mean over ranks of the losses given to ``scale()``)
    is above this. Any loss rule also skips steps whose loss is not finite. Finite."""
    skip_loss_sigma: float | None = field(default=None, metadata={"since": 5})
    """As ``skip_grad_norm_sigma``, for the loss. > 0."""
    skip_loss_ratio: float | None = field(default=None, metadata={"since": 5})
    """As ``skip_grad_norm_ratio``, for the loss (acts only while that mean is > 0). > 1."""
    spike_window: int = field(default=100, metadata={"since": 5})
    """How many recent applied steps the sigma and ratio rules compare with. >= 2."""
    spike_warmup: int = field(default=100, metadata={"since": 5})
    """Applied steps recorded before the sigma and ratio rules act (they also need 2). >= 0."""
    on_fault: OnFault | None = field(default=None, metadata={"since": 5})
    """Fault attribution (see :mod:`distscale.rules`): None (off: every non-finite step is an
    overflow, as torch), or what a suspected fault does besides being skipped without a backoff:
    "warn" (a warning naming rank, host, device and parameters), "raise" (``FaultError`` on every
    rank at the same ``update()``) or "skip" (only counted and reported in ``last_fault_report``).
    Costs one host read per step with fused optimizers (none extra otherwise)."""
    fault_repeats: int = field(default=3, metadata={"since": 5})
    """Non-finite steps in a row, after a clean one, with the same single rank non-finite, from
    which on that rank is a suspected fault (the backoffs between did not cure it). >= 1."""

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
        if self.min_scale_rule not in MIN_SCALE_RULE_CHOICES:
            raise ValueError(
                f"min_scale_rule must be one of {MIN_SCALE_RULE_CHOICES}, got {self.min_scale_rule!r}."
            )
        if _require_int("growth_delay", self.growth_delay) < 0:
            raise ValueError(f"growth_delay must be >= 0, got {self.growth_delay!r}.")
        tolerance = _require_number("tolerance", self.tolerance)
        if not (math.isfinite(tolerance) and tolerance >= 0.0):
            raise ValueError(f"tolerance must be finite and >= 0, got {self.tolerance!r}.")
        if tolerance > 0.0 and self.hysteresis > 1:
            raise ValueError(
                f"tolerance={self.tolerance!r} cannot be combined with hysteresis={self.hysteresis!r}: "
                "both decide which overflows back off. HINT: use one of them (fairseq uses tolerance, "
                "DeepSpeed and Megatron hysteresis)."
            )

        if self.rule not in RULE_CHOICES:
            raise ValueError(
                f"rule must be one of {RULE_CHOICES}, got {self.rule!r}. HINT: 'torch' grows blindly "
                "after growth_interval clean steps, 'amax' only when the gradients leave headroom."
            )
        margin = _require_number("amax_margin", self.amax_margin)
        if not (math.isfinite(margin) and margin > 1.0):
            raise ValueError(
                f"amax_margin must be finite and > 1.0 (a factor of headroom below fp16's maximum), "
                f"got {self.amax_margin!r}."
            )

        self._validate_skip_rules()

        # Store plain Python numbers (numpy scalars would not load with weights_only=True).
        for name in (
            "init_scale",
            "growth_factor",
            "backoff_factor",
            "min_scale",
            "max_scale",
            "tolerance",
            "amax_margin",
            *SPIKE_THRESHOLDS,
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        for name in (
            "growth_interval",
            "hysteresis",
            "growth_delay",
            "spike_window",
            "spike_warmup",
            "fault_repeats",
        ):
            object.__setattr__(self, name, int(getattr(self, name)))

    def _validate_skip_rules(self) -> None:
        lows = {"_above": (0.0, "> 0"), "_sigma": (0.0, "> 0"), "_ratio": (1.0, "> 1")}
        for name in SPIKE_THRESHOLDS:
            value = getattr(self, name)
            if value is None:
                continue
            number = _require_number(name, value)
            if name == "skip_loss_above":  # a loss may be negative
                ok, constraint = math.isfinite(number), "finite"
            else:
                low, constraint = next(v for k, v in lows.items() if name.endswith(k))
                ok = math.isfinite(number) and number > low
                constraint = f"None or finite and {constraint}"
            if not ok:
                hint = (
                    " HINT: k is a number of standard deviations, e.g. 6." if name.endswith("_sigma") else ""
                )
                raise ValueError(f"{name} must be {constraint}, got {value!r}.{hint}")
        if _require_int("spike_window", self.spike_window) < 2:
            raise ValueError(
                f"spike_window must be >= 2 (a standard deviation needs two steps), got {self.spike_window!r}."
            )
        if _require_int("spike_warmup", self.spike_warmup) < 0:
            raise ValueError(f"spike_warmup must be >= 0, got {self.spike_warmup!r}.")
        if self.on_fault is not None and self.on_fault not in ON_FAULT_CHOICES:
            raise ValueError(f"on_fault must be None or one of {ON_FAULT_CHOICES}, got {self.on_fault!r}.")
        if _require_int("fault_repeats", self.fault_repeats) < 1:
            raise ValueError(f"fault_repeats must be >= 1, got {self.fault_repeats!r}.")

    @property
    def norm_rules(self) -> bool:
        """Whether a skip rule watches the gradient norm."""
        return any(getattr(self, n) is not None for n in SPIKE_THRESHOLDS[:3])

    @property
    def loss_rules(self) -> bool:
        """Whether a skip rule watches the loss."""
        return any(getattr(self, n) is not None for n in SPIKE_THRESHOLDS[3:])

    @property
    def decides_beyond_overflow(self) -> bool:
        """Whether any skip rule or fault attribution is on (off: the decision is torch's)."""
        return self.norm_rules or self.loss_rules or self.on_fault is not None

    def contains(self, scale: float) -> bool:
        """Whether ``scale`` lies within [min_scale, max_scale]."""
        return (self.min_scale is None or scale >= self.min_scale) and (
            self.max_scale is None or scale <= self.max_scale
        )

    def to_dict(self) -> dict[str, object]:
        """Plain-number form for ``state_dict`` (None bounds stay None)."""
        return asdict(self)
