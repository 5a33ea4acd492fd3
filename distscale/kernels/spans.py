"""Contiguous spans: tensors that tile memory back to back are checked as one.

DDP's bucket views, FSDP1's original parameters, FSDP2's sharded grads and a user's flat gradient
buffer put many gradients in a few storages. The check and the unscale are elementwise, so running
them once per contiguous span gives bitwise the results of running them once per tensor, for the
price of one kernel call (or loop iteration of torch's op) per span instead of per tensor.

* :func:`merge_spans` is the rule: (address, numel, counted) spans that sit back to back merge,
  keeping counted elements a prefix. The Triton table (:mod:`distscale.kernels._table`) uses it on
  raw addresses.
* :func:`coalesce` gives the torch and reference backends the same: the tensors, with every run of
  contiguous tensors that tile one storage back to back replaced by one 1-D view of it. When no
  tensor starts inside its storage (separately allocated grads) nothing can merge, and one C-level
  pass over the storage offsets says so. Otherwise the plan is cached by data pointers and sizes
  and checked again (contiguity, storage bounds) before each use: no host sync, no copy, no
  gradient-sized memory. Norms are not taken on spans (per-tensor norms keep torch's rounding).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["SpanPlan", "apply", "coalesce", "merge_spans", "plan"]

_OFFSET_OF = torch.Tensor.storage_offset
_DATA_PTR_OF = torch.Tensor.data_ptr
_NUMEL_OF = torch.Tensor.numel
_IS_CONTIGUOUS = operator.methodcaller("is_contiguous")
_CACHE_SIZE = 32


def merge_spans(sources: list[tuple[int, int, int]], elsize: int) -> list[tuple[int, int, int]]:
    """Merge (address, numel, counted) spans that tile memory back to back.

    A merged span must keep its counted elements a prefix: merge only after a fully counted
    span, or a span that counts nothing.
    """
    merged: list[list[int]] = []
    for ptr, numel, counted in sorted(sources):
        if merged:
            last = merged[-1]
            adjacent = last[0] + last[1] * elsize == ptr
            if adjacent and (last[2] == last[1] or counted == 0):
                last[2] = last[1] + counted if last[2] == last[1] else last[2]
                last[1] += numel
                continue
        merged.append([ptr, numel, counted])
    return [(p, n, c) for p, n, c in merged]


@dataclass(frozen=True, slots=True)
class SpanPlan:
    """Which tensors of a list merge into which runs (positions and element counts, no tensors)."""

    kept: tuple[int, ...]  # tensors used as they are
    runs: tuple[tuple[int, int], ...]  # (index of the run's first tensor, elements in the run)
    dense: tuple[int, ...]  # the tensors the runs cover: they must still be contiguous


_cache: OrderedDict[tuple, SpanPlan] = OrderedDict()


def _build(tensors: list[torch.Tensor]) -> SpanPlan:
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    kept: list[int] = []
    dense: list[int] = []
    for i, t in enumerate(tensors):
        if t.numel() and t.is_contiguous():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(
                (int(t.storage_offset()), t.numel(), i)
            )
        else:
            kept.append(i)
    runs: list[tuple[int, int]] = []

    def close(first: int, count: int) -> None:
        # A run of one tensor is that tensor; longer runs become one view.
        if count == tensors[first].numel():
            kept.append(first)
        else:
            runs.append((first, count))
            dense.extend(members_of[first])

    members_of: dict[int, list[int]] = {}
    for members in by_storage.values():
        members.sort()
        start, count, first = members[0]
        members_of[first] = [first]
        for offset, numel, i in members[1:]:
            if offset == start + count:  # back to back in the same storage
                count += numel
                members_of[first].append(i)
            else:
                close(first, count)
                start, count, first = offset, numel, i
                members_of[first] = [first]
        close(first, count)
    return SpanPlan(tuple(sorted(kept)), tuple(runs), tuple(sorted(dense)))


def _pick(
    tensors: list[torch.Tensor], indices: tuple[int, ...]
) -> tuple[torch.Tensor, ...] | list[torch.Tensor]:
    if len(indices) == len(tensors):
        return tensors
    return operator.itemgetter(*indices)(tensors) if len(indices) > 1 else tuple(tensors[i] for i in indices)


def plan(tensors: list[torch.Tensor]) -> SpanPlan | None:
    """How ``tensors`` (one device and dtype) coalesce, checked against the tensors as they are now
    (addresses, sizes, contiguity); None when no two can merge. No host sync."""
    if len(tensors) < 2 or not any(map(_OFFSET_OF, tensors)):
        return None  # every tensor starts its storage: no two can sit back to back in one
    key = (tuple(map(_DATA_PTR_OF, tensors)), tuple(map(_NUMEL_OF, tensors)))
    found = _cache.get(key)
    # The same addresses and sizes: the plan holds if the tensors its runs cover are still dense.
    if found is None or not all(map(_IS_CONTIGUOUS, _pick(tensors, found.dense))):
        found = _build(tensors)
        _cache[key] = found
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return found if found.runs else None


def apply(tensors: list[torch.Tensor], span_plan: SpanPlan | None) -> list[torch.Tensor]:
    """``tensors`` coalesced by ``span_plan`` (from :func:`plan` on tensors with the same addresses,
    sizes and contiguity; None: as they are). No host sync, no copy."""
    if span_plan is None:
        return tensors
    out = [tensors[i] for i in span_plan.kept]
    for first, count in span_plan.runs:
        base = tensors[first]
        offset = base.storage_offset()
        if (offset + count) * base.element_size() > base.untyped_storage().nbytes():
            return list(tensors)  # the run spans another storage now: per tensor
        out.append(base.as_strided((count,), (1,), offset))
    return out


def coalesce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (one device and dtype) with each run of contiguous tensors that tile one storage
    back to back replaced by one 1-D view over the run. Elementwise work on the result touches
    exactly the elements of ``tensors``. No host sync."""
    return apply(tensors, plan(tensors))
