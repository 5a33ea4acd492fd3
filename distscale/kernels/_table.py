"""The host side of the fused check: the per-tensor table a single launch walks, built and cached.

A table holds, per memory span, 5 int64 words: a 16-byte aligned base address, the span's first
and end element index from that base, the end of its counted prefix (the elements that count
toward the norm), and its first block index (a prefix sum of block counts); a block-to-span map
follows. It is copied to the device once per gradient layout and cached with a float32 scratch
buffer of one partial per block, so later calls do O(number of tensors) cheap Python work
(data pointers, numels and identities, ~0.15 us per tensor) and allocate nothing.

The cache key is the tensors' data pointers and numels (plus counted prefixes and block size): it
hits again after ``zero_grad(set_to_none=True)`` when the caching allocator hands the same blocks
back. When the tensor objects differ from those the layout was validated for, the layouts are
checked again (dense, not staged) before reuse. Pure torch: no Triton import here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from distscale.kernels.spans import merge_spans

__all__ = ["ALIGN", "MAX_BLOCK_BYTES", "Plan", "clear_cache", "lookup"]

ALIGN = 16  # bytes; span bases are rounded down to this so that loads vectorize
# Bytes one program reads: enough to hide latency, small enough for a tail of few idle blocks.
MAX_BLOCK_BYTES = 16384
_MIN_BLOCK = 512
_CACHE_SIZE = 32


@dataclass
class Plan:
    """Everything one launch needs, built once per gradient layout."""

    table: torch.Tensor  # int64 on the device: 5 words per span, then the block-to-span map
    host_table: torch.Tensor | None  # pinned source of the copy, kept alive while it may run
    n_spans: int
    n_blocks: int
    block: int
    partials: torch.Tensor  # float32, one per block
    amax_partials: torch.Tensor  # float32, one per block (the largest |value| of each)
    staged: list[tuple[int, torch.Tensor]]  # (index in grads, contiguous staging buffer)
    ids: tuple[int, ...]  # the tensor objects the layout was validated for


_cache: OrderedDict[tuple, Plan] = OrderedDict()


def clear_cache() -> None:
    """Drop the cached tables and scratch buffers (they are rebuilt on the next call)."""
    _cache.clear()


def _dense(t: torch.Tensor) -> bool:
    # Non-overlapping and dense: some permutation of the dims is contiguous.
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _direct(t: torch.Tensor, counted: int) -> bool:
    """Whether ``t`` can be read in place as one span of memory."""
    if not _dense(t) or t.data_ptr() % t.element_size():
        return False
    # A counted prefix means a prefix in row-major order: memory order only if contiguous.
    return counted in (0, t.numel()) or t.is_contiguous()


def _block_size(total: int, n_spans: int, elsize: int) -> int:
    # Spans smaller than a block waste the rest of it: size blocks to the mean span.
    mean = max(1, total // max(1, n_spans))
    return max(_MIN_BLOCK, min(MAX_BLOCK_BYTES // elsize, 1 << (mean - 1).bit_length()))


def _build(grads: list[torch.Tensor], counts: list[int], block: int | None) -> Plan:
    device, dtype = grads[0].device, grads[0].dtype
    elsize = grads[0].element_size()
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "distscale's Triton kernel builds its tensor table on the host, but the gradient tensors "
            "changed while a CUDA graph was being captured. Run one eager step with the same gradient "
            "tensors before capturing (e.g. zero_grad(set_to_none=False), so backward reuses them)."
        )
    sources: list[tuple[int, int, int]] = []
    staged: list[tuple[int, torch.Tensor]] = []
    for index, (t, counted) in enumerate(zip(grads, counts, strict=True)):
        if t.device != device or t.dtype != dtype:
            raise ValueError(
                f"one (device, dtype) group per call: tensor {index} is {t.device}/{t.dtype}, "
                f"the first is {device}/{dtype}."
            )
        if not 0 <= counted <= t.numel():
            raise ValueError(f"norm_numels[{index}] = {counted} is outside [0, {t.numel()}].")
        if t.numel() == 0:
            continue
        if not _direct(t, counted):
            buffer = torch.empty(t.shape, dtype=dtype, device=device)
            staged.append((index, buffer))
            t = buffer
        sources.append((t.data_ptr(), t.numel(), counted))
    spans = merge_spans(sources, elsize)
    if block is None:
        block = _block_size(sum(n for _, n, _ in spans), len(spans), elsize)
    rows: list[int] = []
    blocks_per_span: list[int] = []
    first = 0
    for ptr, numel, counted in spans:
        base = ptr - ptr % ALIGN
        lo = (ptr - base) // elsize
        n = -(-(lo + numel) // block)
        rows += [base, lo, lo + numel, lo + counted, first]
        blocks_per_span.append(n)
        first += n
    owner = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(blocks_per_span, dtype=torch.long))
    host = torch.cat([torch.tensor(rows, dtype=torch.int64), owner.to(torch.int64)])
    pinned: torch.Tensor | None = None
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the stream, no host sync.
        pinned = host.pin_memory()
        table = pinned.to(device, non_blocking=True)
    else:
        table = host
    return Plan(
        table=table,
        host_table=pinned,
        n_spans=len(spans),
        n_blocks=first,
        block=block,
        partials=torch.empty(first, dtype=torch.float32, device=device),
        amax_partials=torch.empty(first, dtype=torch.float32, device=device),
        staged=staged,
        ids=(),
    )


def lookup(grads: list[torch.Tensor], counts: list[int] | None, block: int | None) -> Plan:
    ptrs = tuple(map(torch.Tensor.data_ptr, grads))
    numels = tuple(map(torch.Tensor.numel, grads))
    key = (grads[0].device, grads[0].dtype, ptrs, numels, None if counts is None else tuple(counts), block)
    plan = _cache.get(key)
    ids = tuple(map(id, grads))
    if plan is not None and plan.ids != ids:
        # New tensor objects at the same addresses (zero_grad(set_to_none=True) and a caching
        # allocator that hands the same blocks back): the table holds if the layouts do too.
        full = numels if counts is None else counts
        pairs = zip(grads, full, strict=True)
        if plan.staged or not all(_direct(t, c) for t, c in pairs if t.numel()):
            plan = None  # rare layouts: simply build again
        else:
            plan.ids = ids
    if plan is None:
        plan = _build(grads, list(numels) if counts is None else list(counts), block)
        plan.ids = ids
        _cache[key] = plan
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return plan
