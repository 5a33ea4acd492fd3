"""What every benchmarked implementation provides: a builder, its outputs and its traffic model.

An implementation is built once per (scenario, variant) on the gradient list (outside timing) and
returns a ``run(scale)`` callable that does one scaler check on the list, the way that
implementation does it. ``run`` returns an :class:`Outcome` of device tensors (or whatever host
values the implementation itself produced); the harness reads them only after timing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.traffic import Sizes


@dataclass(frozen=True)
class Scale:
    """One loss scale on the device: ``scale``, ``inv`` = 1/scale (0-dim float32) and its value."""

    scale: torch.Tensor
    inv: torch.Tensor
    inv_value: float

    @classmethod
    def of(cls, inv_value: float, device: torch.device) -> Scale:
        inv = torch.full((), inv_value, dtype=torch.float32, device=device)
        return cls(torch.full((), 1.0 / inv_value, dtype=torch.float32, device=device), inv, inv_value)


@dataclass
class Outcome:
    """found_inf (tensor(s) or bool) and the norm (tensor, float or None) an implementation produced."""

    found_inf: Any
    norm: Any = None


@dataclass(frozen=True)
class Context:
    """What builders need besides the gradients."""

    device: torch.device
    max_norm: float = 1.0


Run = Callable[[Scale], Outcome]
Builder = Callable[[list[torch.Tensor], Context], Run]


@dataclass(frozen=True)
class Impl:
    """One row family of the kernel table.

    Attributes:
        name: short id ("distscale-inplace", "torch-chain", ...).
        label: what it is, in words (re-implementations say so).
        family: "distscale" or "peer".
        mode: "inplace" / "readonly" for distscale rows, None for peers.
        mutates: whether it writes the gradients (then a planted row is refilled between reps).
        norm_kind: "scaled" (norm of the values as read), "unscaled" (after unscale) or None.
        traffic: bytes moved on one list, given whether the list overflows (peers skip passes).
        factor: the factor it applies to clean gradients, from (reference scaled norm, inv_scale,
            max_norm); checked against the float64 norm of the gradients afterwards.
        build: the builder.
    """

    name: str
    label: str
    family: str
    mode: str | None
    mutates: bool
    norm_kind: str | None
    traffic: Callable[[Sizes, bool], int]
    factor: Callable[[float, float, float], float]
    build: Builder


def group_by_dtype(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The (device, dtype) groups, in first-seen order, as every scaler forms them."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return list(groups.values())


def clip_factor(norm: float, max_norm: float) -> float:
    """torch's clip coefficient: clamp(max_norm / (norm + 1e-6), max=1)."""
    return min(1.0, max_norm / (norm + 1e-6))
