"""The scaler's single collective: one small all-reduce per step, identity on one process.

Everything a step needs from other ranks travels in one packed buffer:

* flags: 0/1 inf/NaN flags (one per optimizer): reduced with SUM or MAX, then clamped to 0/1,
  never raw gradient values (gloo's MAX loses a NaN held by the last rank);
* sums: per-rank powers of norms (finite ``norm_type``): SUM;
* maxes: per-rank inf-norms: MAX (NaN is turned into inf first for the same reason);
* slots: per-rank values written at this rank's slot, zeros elsewhere (state fingerprints for the
  consistency check): recovered exactly by SUM or MAX since every entry is >= 0.

One all-reduce covers flags+sums or flags+maxes; a step that mixes finite and infinite norm
types falls back to one all-gather of the same buffer. Every rank issues the collective in the
same order whatever its local values: the buffer's layout depends only on the call sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Packed", "ReduceGroup"]


@dataclass(slots=True)
class Packed:
    flags: list[torch.Tensor]
    sums: list[torch.Tensor]
    maxes: list[torch.Tensor]
    slots: torch.Tensor | None = None  # (num_values,) this rank's values; returned as (world, num_values)


class ReduceGroup:
    """The ranks that share one skip decision. ``group=None`` means the default (world) group
    once ``torch.distributed`` is initialized, and a single process otherwise."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = group
        self.num_collectives = 0  # issued by this object; tests and benchmarks read it

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

    def reduce(self, packed: Packed, dtype: torch.dtype = torch.float32) -> Packed:
        """Reduce ``packed`` across the group with exactly one collective (none on one process).

        Returns flags as 0./1. float32, norms reduced, slots as (world_size, n). Participating
        ranks: every rank of the group, unconditionally. No host sync on NCCL/CUDA.
        """
        world = self.world_size
        parts = [*packed.flags, *packed.sums, *packed.maxes]
        if not parts and packed.slots is None:
            return packed
        device = (parts[0] if parts else packed.slots).device
        maxes = [torch.nan_to_num(m.float(), nan=float("inf")) for m in packed.maxes]
        head = [t.reshape(1).to(device=device, dtype=dtype) for t in (*packed.flags, *packed.sums, *maxes)]
        if world == 1:
            return self._unpack(torch.cat(head) if head else None, packed, world, packed.slots)
        slot_width = 0 if packed.slots is None else packed.slots.numel()
        tail = []
        if packed.slots is not None:
            table = torch.zeros(world, slot_width, dtype=dtype, device=device)
            table[self.rank] = packed.slots.to(device=device, dtype=dtype)
            tail = [table.reshape(-1)]
        buffer = torch.cat(head + tail)
        self.num_collectives += 1
        if packed.sums and packed.maxes:
            gathered = torch.empty(world, buffer.numel(), dtype=dtype, device=device)
            dist.all_gather_into_tensor(gathered, buffer, group=self.group)
            n_flags, n_sums = len(packed.flags), len(packed.sums)
            buffer = torch.cat(
                [
                    gathered[:, : n_flags + n_sums].sum(0),
                    gathered[:, n_flags + n_sums : len(head)].amax(0),
                    gathered[:, len(head) :].sum(0),
                ]
            )
        else:
            op = dist.ReduceOp.MAX if packed.maxes else dist.ReduceOp.SUM
            dist.all_reduce(buffer, op=op, group=self.group)
        slots = buffer[len(head) :].reshape(world, slot_width) if packed.slots is not None else None
        return self._unpack(buffer[: len(head)], packed, world, slots)

    @staticmethod
    def _unpack(head: torch.Tensor | None, packed: Packed, world: int, slots: torch.Tensor | None) -> Packed:
        n_flags, n_sums = len(packed.flags), len(packed.sums)
        if head is None:
            return Packed([], [], [], slots)
        flags = [(f > 0).float().reshape(()) for f in head[:n_flags].float()]
        sums = [s.float().reshape(()) for s in head[n_flags : n_flags + n_sums]]
        maxes = [m.float().reshape(()) for m in head[n_flags + n_sums :]]
        if world == 1 and slots is not None:
            slots = slots.reshape(1, -1)
        return Packed(flags, sums, maxes, slots)
