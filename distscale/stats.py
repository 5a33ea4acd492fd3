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

from typing import NamedTuple

import torch

from distscale.config import ScalerConfig

__all__ = ["STATS_DTYPES", "ScalerStats", "init_stats", "to_host", "update_stats"]

# Smallest magnitude that survives a cast to float16: 2**-25 rounds (to even) to zero, anything
# above rounds to at least the smallest subnormal 2**-24.
FP16_FLUSH = 2.0**-25


class ScalerStats(NamedTuple):
    """0-dim tensors on the scale's device. NaN means "not measured"."""

    overflows: torch.Tensor  # int64: optimizer steps skipped for inf/NaN (each optimizer counts)
    consecutive_overflows: torch.Tensor  # int64: skipped steps in a row, ending at the last update
    max_consecutive_overflows: torch.Tensor  # int64: the longest such run so far
    steps_since_overflow: torch.Tensor  # int64: updates since the last skipped step
    steps_at_min_scale: torch.Tensor  # int64: updates that left the scale at min_scale
    step_was_skipped: torch.Tensor  # bool: the last update's step was skipped (any optimizer)
    grad_norm: torch.Tensor  # float32: job-wide norm of the unscaled grads; NaN if not clipped
    zero_fraction: torch.Tensor  # float32: last underflow-monitor reading (see underflow.py)
    underflow_fraction: torch.Tensor  # float32: idem

    def to(self, device: torch.device | str) -> ScalerStats:
        return ScalerStats(*(t.to(device) for t in self))


STATS_DTYPES: dict[str, torch.dtype] = {
    "overflows": torch.int64,
    "consecutive_overflows": torch.int64,
    "max_consecutive_overflows": torch.int64,
    "steps_since_overflow": torch.int64,
    "steps_at_min_scale": torch.int64,
    "step_was_skipped": torch.bool,
    "grad_norm": torch.float32,
    "zero_fraction": torch.float32,
    "underflow_fraction": torch.float32,
}
INITIAL: dict[str, float | int | bool] = {
    "overflows": 0,
    "consecutive_overflows": 0,
    "max_consecutive_overflows": 0,
    "steps_since_overflow": 0,
    "steps_at_min_scale": 0,
    "step_was_skipped": False,
    "grad_norm": float("nan"),
    "zero_fraction": float("nan"),
    "underflow_fraction": float("nan"),
}


def init_stats(device: torch.device | str = "cpu") -> ScalerStats:
    return ScalerStats(
        **{k: torch.full((), v, dtype=STATS_DTYPES[k], device=device) for k, v in INITIAL.items()}
    )


def update_stats(
    stats: ScalerStats,
    found_inf: torch.Tensor,
    new_scale: torch.Tensor,
    config: ScalerConfig,
    *,
    overflows: torch.Tensor | None = None,
    grad_norm: torch.Tensor | None = None,
    underflow: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ScalerStats:
    """Advance the counters by one update. Pure, no host sync.

    ``found_inf``: the step's job-wide flag (> 0: skipped). ``overflows``: how many optimizers
    skipped (default: 1 if skipped). ``new_scale``: the scale after the rule. ``grad_norm``: the
    step's reduced norm, None when it did not clip. ``underflow``: (zero, underflow) fractions on
    monitor steps; the last reading is kept otherwise.
    """
    device = stats.overflows.device
    found = found_inf.to(device) > 0
    if overflows is None:
        overflows = found.to(torch.int64)
    consecutive = torch.where(found, stats.consecutive_overflows + 1, 0)
    if config.min_scale is None:
        at_min = torch.zeros_like(stats.steps_at_min_scale)
    else:
        at_min = (new_scale.to(device) <= config.min_scale).to(torch.int64)
    nan = torch.full_like(stats.grad_norm, float("nan"))
    zero_fraction, underflow_fraction = stats.zero_fraction, stats.underflow_fraction
    if underflow is not None:
        zero_fraction, underflow_fraction = (u.to(device=device, dtype=torch.float32) for u in underflow)
    return ScalerStats(
        overflows=stats.overflows + overflows.to(device=device, dtype=torch.int64),
        consecutive_overflows=consecutive,
        max_consecutive_overflows=torch.maximum(stats.max_consecutive_overflows, consecutive),
        steps_since_overflow=torch.where(found, 0, stats.steps_since_overflow + 1),
        steps_at_min_scale=stats.steps_at_min_scale + at_min,
        step_was_skipped=found,
        grad_norm=nan if grad_norm is None else grad_norm.to(device=device, dtype=torch.float32),
        zero_fraction=zero_fraction,
        underflow_fraction=underflow_fraction,
    )


def to_host(named: dict[str, torch.Tensor]) -> dict[str, bool | int | float]:
    """0-dim tensors as Python bools, ints and floats (by dtype). One host sync for all of them."""
    values = torch.stack([t.double().cpu() for t in named.values()]).tolist()  # host sync
    out: dict[str, bool | int | float] = {}
    for (name, tensor), value in zip(named.items(), values, strict=True):
        if tensor.dtype is torch.bool:
            out[name] = bool(value)
        elif tensor.dtype.is_floating_point:
            out[name] = float(value)
        else:
            out[name] = int(value)
    return out
