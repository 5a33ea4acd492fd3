"""Per-iteration bookkeeping of the façade: one record per optimizer, reset by ``update()``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import Enum

import torch

from distscale.overflow import GradSet


class OptState(Enum):
    """torch.amp.GradScaler's per-optimizer stages (what the *user* has called)."""

    READY = 0
    UNSCALED = 1
    STEPPED = 2


@dataclass(eq=False)
class Batch:
    """Flags reduced by one collective; read on the host at most once (the one sync)."""

    flags: torch.Tensor
    host: list[float] | None = None

    def read(self) -> list[float]:
        if self.host is None:
            self.host = self.flags.tolist()  # host sync (documented in GradScaler.step)
        return self.host


@dataclass(eq=False)
class OptRecord:
    optimizer: weakref.ref[torch.optim.Optimizer]
    stage: OptState = OptState.READY
    grads: GradSet | None = None
    local_found_inf: torch.Tensor | None = None  # this rank's flag
    unscaled: bool = False  # grads hold unscaled values
    norm_type: float | None = None  # norm computed for this optimizer (clip, or planned clip)
    local_norm: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None  # job-wide flag, same on every rank
    total_norm: torch.Tensor | None = None  # job-wide norm of the unscaled grads
    batch: Batch | None = None
    batch_index: int = 0
    clipped: bool = False  # clip_grad_norm_ was called
    clip_coef: torch.Tensor | None = None  # folded into grad_scale at a fused step
    underflow: torch.Tensor | None = None  # local (zeros, would_flush, total) on monitor steps
    underflow_reduced: torch.Tensor | None = None  # the same, summed over the group

    @property
    def checked(self) -> bool:
        return self.local_found_inf is not None

    @property
    def reduced(self) -> bool:
        return self.found_inf is not None and (self.norm_type is None or self.total_norm is not None)

    def invalidate(self) -> None:
        """The grads changed: everything derived from them must be computed again."""
        self.local_found_inf = self.found_inf = None
        self.local_norm = self.total_norm = None
        self.underflow = self.underflow_reduced = None
        self.batch = None


@dataclass
class Iteration:
    """What happened since the last ``update()``."""

    records: dict[int, OptRecord] = field(default_factory=dict)
    num_collectives: int = 0

    def record(self, optimizer: torch.optim.Optimizer) -> OptRecord:
        rec = self.records.get(id(optimizer))
        if rec is None or rec.optimizer() is not optimizer:
            rec = self.records[id(optimizer)] = OptRecord(weakref.ref(optimizer))
        return rec
