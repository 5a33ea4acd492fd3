"""Overflow diagnostics: on a skipped step, which parameters held inf/NaN gradients, on which rank.

Opt-in (``GradScaler(overflow_diagnostics=True)``). Clean steps cost nothing beyond reading the
step's job-wide flags on the host, which the scaler does anyway for optimizers that are not fused
(one ``tolist()`` per step); with fused optimizers that read is the one extra host sync. On an
overflow step every rank of the scaler's group (they all see the same flags) scans its local
gradients, one host read, and the findings are gathered to the group's rank 0, which logs them on
the ``"distscale"`` logger and keeps them in ``GradScaler.last_overflow_report``.

The flag read is a host sync, so diagnostics cannot run inside a CUDA-graph capture.

The scan reads the gradients as they are when the flag is reduced: after ``unscale_`` (inf and NaN
survive a multiplication by a finite positive ``inv_scale``) and before any clip.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distscale.collectives import ReduceGroup
from distscale.sharding import LocalGrad

__all__ = [
    "FaultReport",
    "NonFiniteGrad",
    "OverflowReport",
    "RankSite",
    "gather",
    "gather_fault",
    "parameter_names",
    "scan",
]

logger = logging.getLogger("distscale")


@dataclass(frozen=True)
class NonFiniteGrad:
    """One local gradient (shard) that held non-finite values."""

    rank: int  # rank in the scaler's group
    name: str
    num_inf: int  # +inf and -inf
    num_nan: int
    numel: int  # elements of the local shard
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "+".join(k for k, n in (("inf", self.num_inf), ("nan", self.num_nan)) if n)


@dataclass(frozen=True)
class OverflowReport:
    step: int  # update() calls before this step (0-based step index)
    world_size: int
    grads: list[NonFiniteGrad]

    @property
    def ranks(self) -> list[int]:
        return sorted({g.rank for g in self.grads})

    def format(self, limit: int = 20) -> str:
        lines = [
            f"step {self.step}: non-finite gradients in {len(self.grads)} local tensor(s) on "
            f"rank(s) {self.ranks} of {self.world_size}; the step is skipped on every rank"
        ]
        for g in self.grads[:limit]:
            lines.append(
                f"  rank {g.rank}: {g.name} {list(g.shape)}: {g.kind} (inf {g.num_inf}, nan {g.num_nan} "
                f"of {g.numel})"
            )
        if len(self.grads) > limit:
            lines.append(f"  ... and {len(self.grads) - limit} more")
        return "\n".join(lines)


def parameter_names(optimizer: torch.optim.Optimizer, named: Mapping[int, str] | None) -> dict[int, str]:
    """``id(param.grad) -> name``: the model's names where known, else the optimizer position."""
    names: dict[int, str] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is not None:
                name = None if named is None else named.get(id(p))
                names[id(p.grad)] = name or f"param_groups[{g}]['params'][{i}]"
    return names


def scan(grads: Iterable[LocalGrad], names: Mapping[int, str], rank: int) -> list[NonFiniteGrad]:
    """This rank's non-finite local gradients. One host read (call on overflow steps only)."""
    grads = list(grads)
    if not grads:
        return []
    device = grads[0].tensor.device
    with torch.no_grad():
        # Counted on each tensor's device, gathered on one (no host copy per tensor), read once.
        counts = torch.stack(
            [
                torch.stack([torch.isinf(g.tensor).sum(), torch.isnan(g.tensor).sum()]).to(device)
                for g in grads
            ]
        ).tolist()  # host sync
    return [
        NonFiniteGrad(
            rank, names.get(id(g.source), "<unnamed>"), n_inf, n_nan, g.tensor.numel(), tuple(g.source.shape)
        )
        for g, (n_inf, n_nan) in zip(grads, counts, strict=True)
        if n_inf or n_nan
    ]


def gather(local: list[NonFiniteGrad], reducer: ReduceGroup, step: int) -> OverflowReport | None:
    """Gather every rank's findings to the group's rank 0, which logs and returns the report.

    Every rank of the group must call it (they do: the flags they act on are job-wide).
    Returns None on the other ranks.
    """
    group, world, rank = reducer.group, reducer.world_size, reducer.rank
    if world == 1:
        parts: list[list[NonFiniteGrad]] = [local]
    else:
        assert group is not None  # several ranks: torch.distributed is initialized
        gathered: list[list[NonFiniteGrad]] | None = [[] for _ in range(world)] if rank == 0 else None
        dist.gather_object(local, gathered, dst=dist.get_global_rank(group, 0), group=group)
        if gathered is None:
            return None
        parts = gathered
    report = OverflowReport(step, world, [g for part in parts for g in part])
    logger.warning("%s", report.format())
    return report


@dataclass(frozen=True)
class RankSite:
    """Where one rank runs, and what it found on a suspected-fault step."""

    rank: int  # rank in the scaler's group
    host: str
    device: str  # the gradients' device, with LOCAL_RANK when the launcher set it
    grads: list[NonFiniteGrad]


_WHY = {
    "lone_rank": "non-finite gradients on this rank only, step after step, although the scale backed off",
    "min_scale": "non-finite gradients with the scale at its floor: a backoff cannot cure them",
    "nonfinite_loss": "a non-finite loss from finite gradients",
}


@dataclass(frozen=True)
class FaultReport:
    """A suspected fault (see :mod:`distscale.rules`): the same on every rank."""

    step: int  # update() calls before this step
    kind: str  # a FAULT_KINDS name
    rank: int  # the rank named (-1: not one rank)
    sites: list[RankSite]

    @property
    def site(self) -> RankSite | None:
        """The named rank's site (None when no single rank is named)."""
        return next((s for s in self.sites if s.rank == self.rank), None)

    def format(self, limit: int = 10) -> str:
        site = self.site
        where = (
            f"rank {site.rank} on host {site.host!r}, device {site.device}"
            if site is not None
            else f"no single rank ({sum(bool(s.grads) for s in self.sites)} rank(s) non-finite)"
        )
        lines = [
            f"step {self.step}: suspected fault ({self.kind}: {_WHY.get(self.kind, self.kind)}): {where}"
        ]
        shown = site.grads if site is not None else [g for s in self.sites for g in s.grads]
        for g in shown[:limit]:
            lines.append(
                f"  rank {g.rank}: {g.name} {list(g.shape)}: {g.kind} (inf {g.num_inf}, nan {g.num_nan} of {g.numel})"
            )
        if len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more")
        lines.append("  The step is skipped on every rank and the scale held (a backoff would not cure it).")
        return "\n".join(lines)


def _device_name(grads: list[NonFiniteGrad], device: torch.device | None) -> str:
    name = "cpu" if device is None else str(device)
    local = os.environ.get("LOCAL_RANK")
    return name if local is None else f"{name} (LOCAL_RANK {local})"


def gather_fault(
    kind: str,
    rank: int,
    local: list[NonFiniteGrad],
    reducer: ReduceGroup,
    step: int,
    device: torch.device | None = None,
) -> FaultReport:
    """Every rank's site and findings, on every rank (so each can raise the same error).

    Every rank of the group must call it (they do: the verdict they act on is job-wide).
    """
    site = RankSite(reducer.rank, socket.gethostname(), _device_name(local, device), local)
    sites = reducer.all_gather_object(site)
    return FaultReport(step, kind, rank, sites)  # type: ignore[arg-type]
