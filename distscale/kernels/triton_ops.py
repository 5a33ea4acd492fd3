"""The fused local check in Triton: one launch per (device, dtype) group, whatever its tensor count.

``fused_check_(grads, found_inf, inv_scale, norm_type)`` reads every element once and, in that
one pass, sets ``found_inf`` to 1.0 if any element is inf/NaN, multiplies the elements by
``inv_scale`` in place (``x * inv_scale`` in float32, cast back: bitwise what
``torch._amp_foreach_non_finite_check_and_unscale_`` writes) unless ``inv_scale`` is None (then
nothing is written), and accumulates per-block float32 partials of the group's 2-norm (sum of
squares) or inf-norm (max |x|) of the values *as read*. The partials are reduced on the device.

How one launch covers many tensors: a device-side table (:mod:`distscale.kernels._table`) holds,
per memory span, an aligned base address, the span's element range, the prefix of it that counts
toward the norm, and its first block index (a prefix sum of block counts); a block-to-span map
follows. Program ``pid`` looks up its span and works on one block of it: full blocks unmasked
(vectorized), the span's first and last blocks masked. The table is built on the host once per
gradient layout and cached, so a step costs O(number of tensors) of cheap Python work plus one
kernel launch and, with a norm, one small reduction; no host sync. Scratch memory: one float32
per block, cached with the table.

Layout handling: dense tensors (any stride order without gaps or overlap) are read in memory
order. Spans that tile one range of memory (DDP buckets with ``gradient_as_bucket_view``, FSDP
flat grads) are merged into one span. Other layouts go through a cached contiguous staging buffer
(copied in, and back after unscaling).

CUDA graphs: after one eager call with the same gradient tensors the call allocates nothing that
depends on the data and never syncs, so it can be captured; a table cannot be built *during* a
capture (it is copied from the host), which raises with the fix.
"""

from __future__ import annotations

import math

import torch

from distscale.kernels import _table

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised by a test that hides triton
    raise ImportError(
        'distscale\'s Triton kernel (kernel="triton") needs Triton: pip install "distscale[triton]"'
    ) from exc

__all__ = ["INTERPRETED", "clear_cache", "fused_check_"]

clear_cache = _table.clear_cache

# Globals a kernel reads must be constexpr.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_BASE_ALIGN = tl.constexpr(_table.ALIGN)

_NORM_NONE, _NORM_SQUARES, _NORM_MAX = 0, 1, 2

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _bf16_round(v):
    # float32 -> bfloat16, round to nearest even (what a GPU's cvt.rn does and torch computes).
    # Only for Triton's interpreter, whose own cast truncates.
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, (u >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _visit(
    ptrs,
    in_range,
    counted,
    inv,
    UNSCALE: tl.constexpr,
    NORM: tl.constexpr,
    AMAX: tl.constexpr,
    MASKED: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    # One block: returns (number of non-finite elements, norm partial, amax partial). ``counted``
    # is a scalar in the unmasked path (the whole block counts or not) and a per-element mask
    # otherwise. The amax is over every element of the block in range, counted or not.
    if MASKED:
        x = tl.load(ptrs, mask=in_range, other=0.0)
    else:
        x = tl.load(ptrs)
    xf = x.to(tl.float32)
    ax = tl.abs(xf)
    # NaN fails every comparison, so this counts NaN as well as +-inf.
    bad = tl.sum(tl.where(ax <= _FLT_MAX, 0, 1), axis=0)
    if UNSCALE:
        # Multiply in float32 and round once, as torch's kernel: bitwise the same result.
        if BF16_BY_HAND:
            y = _bf16_round(xf * inv)
        else:
            y = (xf * inv).to(x.dtype)
        if MASKED:
            tl.store(ptrs, y, mask=in_range)
        else:
            tl.store(ptrs, y)
    part = 0.0
    if NORM == 1:
        part = tl.sum(tl.where(counted, xf * xf, 0.0), axis=0)
    elif NORM == 2:
        # max() drops NaN on the GPU; torch's inf-norm propagates it, so carry it explicitly.
        nans = tl.sum(tl.where(counted & (xf != xf), 1, 0), axis=0)
        part = tl.max(tl.where(counted, ax, 0.0), axis=0)
        part = tl.where(nans > 0, float("nan"), part)
    amax = 0.0
    if AMAX:
        # As torch's inf-norm of the values as read: NaN propagates (see NORM == 2).
        amax = tl.max(tl.where(in_range, ax, 0.0), axis=0)
        amax = tl.where(tl.sum(tl.where(in_range & (xf != xf), 1, 0), axis=0) > 0, float("nan"), amax)
    return bad, part, amax


@triton.jit(do_not_specialize=["n_spans"])
def _check_kernel(
    table_ptr,
    n_spans,
    found_ptr,
    inv_ptr,
    partial_ptr,
    amax_partial_ptr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    UNSCALE: tl.constexpr,
    NORM: tl.constexpr,
    AMAX: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    span = tl.load(table_ptr + 5 * n_spans + pid)
    row = table_ptr + 5 * span
    # Bases are 16-byte aligned by construction: the hint lets the compiler vectorize.
    base = tl.multiple_of(tl.load(row).to(tl.pointer_type(DTYPE)), _BASE_ALIGN)
    start = (pid - tl.load(row + 4)) * BLOCK
    # Element range of the span and its counted prefix, relative to this block, in [0, BLOCK].
    lo = tl.minimum(tl.maximum(tl.load(row + 1) - start, 0), BLOCK).to(tl.int32)
    hi = tl.minimum(tl.maximum(tl.load(row + 2) - start, 0), BLOCK).to(tl.int32)
    nhi = tl.minimum(tl.maximum(tl.load(row + 3) - start, 0), BLOCK).to(tl.int32)
    inv = 1.0
    if UNSCALE:
        inv = tl.load(inv_ptr)
    offs = tl.arange(0, BLOCK)
    ptrs = base + start + offs
    # Full blocks (the common case) run unmasked so that loads and stores vectorize.
    if (lo == 0) & (hi == BLOCK) & ((nhi == 0) | (nhi == BLOCK)):
        bad, part, amax = _visit(
            ptrs, offs < BLOCK, nhi == BLOCK, inv, UNSCALE, NORM, AMAX, False, BF16_BY_HAND
        )
    else:
        in_range = (offs >= lo) & (offs < hi)
        bad, part, amax = _visit(
            ptrs, in_range, in_range & (offs < nhi), inv, UNSCALE, NORM, AMAX, True, BF16_BY_HAND
        )
    if NORM != 0:
        tl.store(partial_ptr + pid, part)
    if AMAX:
        tl.store(amax_partial_ptr + pid, amax)
    if bad > 0:
        # Every writer stores the same value: a plain store is race-free in effect (as torch's).
        tl.store(found_ptr, 1.0)


def _interpreted() -> bool:
    return not isinstance(_check_kernel, triton.runtime.jit.JITFunction)


INTERPRETED: bool = _interpreted()
"""Whether the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` at first import):
then it works on CPU tensors only."""


def _check_device(t: torch.Tensor) -> None:
    if INTERPRETED and t.device.type != "cpu":
        raise ValueError(
            f"TRITON_INTERPRET=1 runs distscale's Triton kernel on the host: it cannot read {t.device} "
            "tensors. Unset TRITON_INTERPRET, or use kernel='torch'."
        )
    if not INTERPRETED and t.device.type != "cuda":
        raise ValueError(
            f"kernel='triton' needs CUDA tensors, got {t.device} tensors. Use kernel='auto' or 'torch', "
            "or set TRITON_INTERPRET=1 before distscale's Triton kernel is first imported to run it in "
            "Triton's (slow) interpreter."
        )


def _check_scalar(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        raise ValueError(
            f"{name} must be a one-element float32 tensor on {device}, "
            f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}."
        )


def _launch(
    plan: _table.Plan,
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | None,
    norm_kind: int,
    dtype: torch.dtype,
    amax: bool,
) -> None:
    _check_kernel[(plan.n_blocks,)](
        plan.table,
        plan.n_spans,
        found_inf,
        found_inf if inv_scale is None else inv_scale,  # unread without UNSCALE
        plan.partials if norm_kind else found_inf,  # unwritten without NORM
        plan.amax_partials if amax else found_inf,  # unwritten without AMAX
        DTYPE=_TL_DTYPES[dtype],
        BLOCK=plan.block,
        UNSCALE=inv_scale is not None,
        NORM=norm_kind,
        AMAX=amax,
        BF16_BY_HAND=INTERPRETED and dtype is torch.bfloat16,
        num_warps=8 if plan.block * dtype.itemsize >= _table.MAX_BLOCK_BYTES else 4,
    )


def fused_check_(
    grads: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | None,
    norm_type: float | None = None,
    *,
    norm_numels: list[int] | None = None,
    block: int | None = None,
    amax_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Check one (device, dtype) group for inf/NaN, unscale it in place, and take its norm: one pass.

    Args:
        grads: tensors of one device and dtype (float32, float16 or bfloat16).
        found_inf: one-element float32 tensor on the same device; set to 1.0 if any element of
            ``grads`` is inf/NaN, left alone otherwise.
        inv_scale: one-element float32 tensor multiplied into ``grads`` in place; None: read only.
        norm_type: 2.0 or inf for the norm of the values as read (before unscaling); None: no norm.
        norm_numels: per tensor, how many leading elements (row-major) count toward the norm
            (default: all); every element is checked.
        block: elements per program (a power of two); default: sized to the tensors.
        amax_out: a one-element float32 tensor on the same device: raised to the largest |value|
            as read (NaN if a NaN is read) in the same pass; None: not measured.

    Returns the norm as a 0-dim float32 tensor on the grads' device, or None when ``norm_type``
    is None. No host sync; one kernel launch plus, with a norm, one small reduction.
    """
    if norm_type is not None and norm_type not in (2.0, math.inf):
        raise ValueError(f"the fused kernel takes the 2-norm or the inf-norm, got norm_type={norm_type!r}.")
    if not grads:
        return None if norm_type is None else torch.zeros((), dtype=torch.float32, device=found_inf.device)
    first = grads[0]
    _check_device(first)
    if first.dtype not in _TL_DTYPES:
        raise ValueError(f"the fused kernel takes float32, float16 or bfloat16 tensors, got {first.dtype}.")
    _check_scalar("found_inf", found_inf, first.device)
    if inv_scale is not None:
        _check_scalar("inv_scale", inv_scale, first.device)
    if amax_out is not None:
        _check_scalar("amax_out", amax_out, first.device)
    if norm_numels is not None and len(norm_numels) != len(grads):
        raise ValueError(f"norm_numels has {len(norm_numels)} entries for {len(grads)} tensors.")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}.")
    plan = _table.lookup(grads, norm_numels, block)
    for index, buffer in plan.staged:
        buffer.copy_(grads[index])
    norm_kind = {None: _NORM_NONE, 2.0: _NORM_SQUARES, math.inf: _NORM_MAX}[norm_type]
    if plan.n_blocks:
        device = first.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            # Triton launches on the current device; torch ops follow their tensors.
            with torch.cuda.device(device):
                _launch(plan, found_inf, inv_scale, norm_kind, first.dtype, amax_out is not None)
        else:
            _launch(plan, found_inf, inv_scale, norm_kind, first.dtype, amax_out is not None)
        if amax_out is not None:
            amax_out.copy_(torch.maximum(amax_out, plan.amax_partials.amax()).reshape(amax_out.shape))
    if inv_scale is not None:
        for index, buffer in plan.staged:
            grads[index].copy_(buffer)
    if norm_kind == _NORM_NONE:
        return None
    if not plan.n_blocks:
        return torch.zeros((), dtype=torch.float32, device=first.device)
    if norm_kind == _NORM_SQUARES:
        return plan.partials.sum().sqrt()
    return plan.partials.amax()
