"""The scaler's single collective: one small all-reduce per step, identity on one process.

Everything a step needs from other ranks travels in one packed buffer (a :class:`Contribution`
in, a :class:`Reduced` out):

* flags: 0/1 flags (inf/NaN per optimizer, layout checks): reduced with SUM or MAX, then clamped
  to 0/1, never raw gradient values (gloo's MAX loses a NaN held by the last rank);
* norms: each rank's norm of its share and the norm type. A finite ``p`` travels as ``norm**p``
  (SUM) and comes back as the p-th root; an inf-norm travels as is (MAX; NaN turned into inf
  first, for the same reason). On one process the norm comes back untouched (no power round trip);
* sums: counts summed as they are (underflow counts), any shape;
* slots: per-rank values written at this rank's slot, zeros elsewhere (state fingerprints for the
  consistency check): recovered exactly by SUM or MAX since every entry is >= 0.

One all-reduce covers everything unless a step mixes inf-norms with finite norms or sums; then
one all-gather of the same buffer. Every rank issues the collective in the same order whatever
its local values: the buffer's layout depends only on the call sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Contribution", "ReduceGroup", "Reduced"]

# torch 2.13 renamed all_gather_into_tensor (now deprecated); older releases have only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(slots=True)
class Contribution:
    """This rank's part of one collective."""

    flags: list[torch.Tensor] = field(default_factory=list)
    norms: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    """(this rank's norm, its norm type) pairs."""
    sums: list[torch.Tensor] = field(default_factory=list)
    slots: torch.Tensor | None = None
    """(num_values,) this rank's values; returned as (world, num_values)."""


@dataclass(slots=True)
class Reduced:
    """The job-wide values, identical on every rank, in the order they were contributed."""

    flags: list[torch.Tensor]
    """0-dim float32, 0. or 1."""
    norms: list[torch.Tensor]
    """0-dim float32 job-wide norms."""
    sums: list[torch.Tensor]
    """float32 (or the reduce dtype), the shapes contributed."""
    slots: torch.Tensor | None


class ReduceGroup:
    """The ranks that share one skip decision. ``group=None`` means the default (world) group
    once ``torch.distributed`` is initialized, and a single process otherwise."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = group

    @property
    def group(self) -> dist.ProcessGroup | None:
        if self._group is not None:
            return self._group
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    @property
    def world_size(self) -> int:
        group = self.group
        return 1 if group is None else dist.get_world_size(group)

    @property
    def rank(self) -> int:
        group = self.group
        return 0 if group is None else dist.get_rank(group)

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """The group's ranks in the default group (``(0,)`` on one process)."""
        group = self.group
        return (0,) if group is None else tuple(dist.get_process_group_ranks(group))

    @property
    def global_rank(self) -> int:
        return 0 if self.group is None else dist.get_rank()

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in group rank order (pickled; for error paths, not per step).
        Every rank of the group must call it."""
        group = self.group
        if group is None or self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    def reduce(self, contribution: Contribution, dtype: torch.dtype = torch.float32) -> Reduced:
        """Reduce ``contribution`` across the group with exactly one collective (none on one process).

        Participating ranks: every rank of the group, unconditionally. No host sync on NCCL/CUDA.
        ``dtype``: the buffer's (float64 keeps state fingerprints exact).
        """
        c = contribution
        world = self.world_size
        tensors = [*c.flags, *(n for n, _ in c.norms), *c.sums]
        if not tensors and c.slots is None:
            return Reduced([], [], [], None)
        device = tensors[0].device if tensors else c.slots.device  # type: ignore[union-attr]
        distributed = world > 1
        # Norms in the order [finite..., inf...]: finite ones add up, inf ones take the max.
        finite = [i for i, (_, p) in enumerate(c.norms) if not math.isinf(p)]
        infinite = [i for i, (_, p) in enumerate(c.norms) if math.isinf(p)]

        def powered(i: int) -> torch.Tensor:
            norm, p = c.norms[i]
            return norm**p if distributed else norm  # one process: no power round trip

        summed = [
            *(f.reshape(1) for f in c.flags),
            *(powered(i).reshape(1) for i in finite),
            *(s.reshape(-1) for s in c.sums),
        ]
        inf = float("inf")
        maxed = [
            (
                torch.nan_to_num(c.norms[i][0].float(), nan=inf, posinf=inf) if distributed else c.norms[i][0]
            ).reshape(1)
            for i in infinite
        ]
        head = torch.cat([t.to(device=device, dtype=dtype) for t in (*summed, *maxed)])
        n_summed = sum(t.numel() for t in summed)
        slots = None
        if not distributed:
            slots = None if c.slots is None else c.slots.reshape(1, -1)
        else:
            buffer = head
            if c.slots is not None:
                table = torch.zeros(world, c.slots.numel(), dtype=dtype, device=device)
                table[self.rank] = c.slots.to(device=device, dtype=dtype)
                buffer = torch.cat([head, table.reshape(-1)])
            if maxed and n_summed > len(c.flags):  # MAX would break sums: gather instead
                # The concatenated form (world * n): gloo refuses the stacked (world, n) output.
                flat = torch.empty(world * buffer.numel(), dtype=dtype, device=device)
                _all_gather_single(flat, buffer, group=self.group)
                gathered = flat.view(world, buffer.numel())
                buffer = torch.cat(
                    [
                        gathered[:, :n_summed].sum(0),
                        gathered[:, n_summed : head.numel()].amax(0),
                        gathered[:, head.numel() :].sum(0),
                    ]
                )
            else:  # flags and slots survive either op
                dist.all_reduce(
                    buffer, op=dist.ReduceOp.MAX if maxed else dist.ReduceOp.SUM, group=self.group
                )
            head = buffer[: head.numel()]
            if c.slots is not None:
                slots = buffer[head.numel() :].reshape(world, c.slots.numel())
        return self._unpack(head, c, finite, infinite, distributed, slots)

    @staticmethod
    def _unpack(
        head: torch.Tensor,
        c: Contribution,
        finite: list[int],
        infinite: list[int],
        distributed: bool,
        slots: torch.Tensor | None,
    ) -> Reduced:
        flags = [(f > 0).float().reshape(()) for f in head[: len(c.flags)].float()]
        at = len(c.flags)
        norms: list[torch.Tensor | None] = [None] * len(c.norms)
        for i in finite:
            value = head[at].float()
            norms[i] = value ** (1.0 / c.norms[i][1]) if distributed else value
            at += 1
        sums = []
        for s in c.sums:
            sums.append(head[at : at + s.numel()].float().reshape(s.shape))
            at += s.numel()
        for i in infinite:
            norms[i] = head[at].float()
            at += 1
        return Reduced(flags, norms, sums, slots)  # type: ignore[arg-type]
