"""Local gradient kernels behind one entry point; the backend is resolved once per (device, dtype) group.

``backend(kernel, device, dtype)`` resolves a ``kernel`` choice for one group to the backend that
runs it: "triton", "torch" or "reference" (raising where the choice cannot run there).

``check_(grads, found_inf, inv_scale, norm_type, backend=..., norm_numels=None)`` is the one entry
point: it sets ``found_inf`` to 1.0 if any element of the group ``grads`` is inf/NaN (checked
*before* scaling, as torch does), multiplies ``grads`` in place by ``inv_scale`` (skipped when
``inv_scale`` is None: read-only), and, when ``norm_type`` is not None, returns the group's
``norm_type`` norm of the values *as read* (before unscaling), counting only the first
``norm_numels[i]`` elements (row-major) of each tensor (default: all), as a 0-dim float32 tensor
on the grads' device (zero for an empty group; None without a norm). With the "triton" backend
and a 2-norm or inf-norm this is one pass over the gradients; otherwise per-tensor norms are taken
first, then the check runs (two passes). The Triton norm is accumulated in float32 per block and
is not bitwise torch's (relative error ~1e-6); its unscaled values and ``found_inf`` are.
``norms(grads, norm_type, backend)``: per-tensor norms (the separate pass). ``amax_out``: the
group's largest |value| as read (every element, counted or not: a maximum counts replicas once
anyway), in the fused pass with Triton, in one more pass otherwise; only asked for by the "amax"
rule.

Backends:

* "torch": torch's multi-tensor AMP op; its CUDA kernel has no bf16, so "auto" sends bf16 on CUDA
  to the reference.
* "reference": plain torch ops, the ground truth.
* "triton": :mod:`distscale.kernels.triton_ops`, one launch per group (float32, float16,
  bfloat16). CUDA tensors only, except under ``TRITON_INTERPRET=1`` where it runs in Triton's
  interpreter on CPU tensors only (for tests). ``norms`` keeps torch's per-tensor norms: the fused
  pass yields only a group total.
* "auto" (a choice, not a backend): "triton" for CUDA tensors when Triton imports (and is not in
  interpreter mode), else "torch", so on CPU "auto" is exactly "torch".

No backend syncs with the host. This package never imports :mod:`distscale.policy` or
:mod:`distscale.stats` (checked by an import-linter contract): it sees tensors, not the rule.
"""

from __future__ import annotations

import math
import os
import sys
from functools import cache
from types import ModuleType
from typing import Literal

import torch

from distscale.kernels import reference, spans, torch_ops

KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "reference", "triton")
Backend = Literal["triton", "torch", "reference"]
FUSED_NORM_TYPES: tuple[float, ...] = (2.0, math.inf)

__all__ = ["FUSED_NORM_TYPES", "KERNEL_CHOICES", "Backend", "backend", "check_", "coalesce", "norms"]

coalesce = spans.coalesce

_TRITON_MODULE = "distscale.kernels.triton_ops"


def _triton_ops() -> ModuleType:
    # Imported on first use: importing Triton costs ~1 s and it is an optional dependency.
    from distscale.kernels import triton_ops

    return triton_ops


@cache
def _triton_importable() -> bool:
    try:
        _triton_ops()
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    # Triton decides at decoration time; once our kernel exists, it is the authority.
    module = sys.modules.get(_TRITON_MODULE)
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def backend(kernel: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that ``kernel`` runs on for a (device, dtype) group: "triton", "torch" or
    "reference". Raises ValueError for an unknown kernel or "triton" where it cannot run, and
    ImportError (with the install command) for "triton" without Triton. No host sync."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}.")
    if kernel == "reference":
        return "reference"
    triton_dtype = dtype in (torch.float32, torch.float16, torch.bfloat16)
    if kernel == "triton":
        if device.type == "cpu" and not _interpreting():
            raise ValueError(
                "kernel='triton' runs on CUDA tensors; these are on the CPU. Use kernel='auto' (or "
                "'torch'), or set TRITON_INTERPRET=1 before the first use of the Triton kernel to run it "
                "in Triton's (slow) interpreter, for testing."
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"kernel='triton' runs on CUDA tensors, got {device}. Use kernel='auto'.")
        if not triton_dtype:
            raise ValueError(f"kernel='triton' takes float32, float16 or bfloat16 grads, got {dtype}.")
        _triton_ops()  # ImportError with the install hint when Triton is missing
        return "triton"
    if kernel == "auto" and device.type == "cuda" and triton_dtype and not _interpreting():
        if _triton_importable():
            return "triton"
    return "torch" if torch_ops.supports(device, dtype) else "reference"


def norms(grads: list[torch.Tensor], norm_type: float, backend: Backend) -> list[torch.Tensor]:
    """Per-tensor ``norm_type`` norms (float32 for 16-bit grads). No host sync.

    Only the "reference" backend has norms of its own: torch's multi-tensor norm serves the others
    (every dtype on every device; the fused Triton pass yields group totals, not per-tensor norms).
    """
    if not grads:
        return []
    return (reference if backend == "reference" else torch_ops).norms(grads, norm_type)


def _counted(grads: list[torch.Tensor], norm_numels: list[int] | None) -> list[torch.Tensor]:
    if norm_numels is None:
        return [g for g in grads if g.numel()]
    return [g.reshape(-1)[:n] for g, n in zip(grads, norm_numels, strict=True) if n]


def check_(
    grads: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | None,
    norm_type: float | None = None,
    *,
    backend: Backend,
    norm_numels: list[int] | None = None,
    amax_out: torch.Tensor | None = None,
    coalesced: list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Check (and unscale) one (device, dtype) group on ``backend``; return the norm of its values
    as read when ``norm_type`` is given; raise ``amax_out`` (0-dim float32 on the grads' device)
    to their largest |value| as read (every element; NaN if one is NaN). Semantics in the module
    docstring. ``coalesced``: ``spans.coalesce(grads)`` when the caller has it already (the
    torch and reference backends check those views). No host sync."""
    if norm_type is not None:
        norm_type = float(norm_type)
    if norm_numels is not None and len(norm_numels) != len(grads):
        raise ValueError(f"norm_numels has {len(norm_numels)} entries for {len(grads)} tensors.")
    if not grads:
        return None if norm_type is None else torch.zeros((), dtype=torch.float32, device=found_inf.device)
    if backend == "triton" and (norm_type is None or norm_type in FUSED_NORM_TYPES):
        return _triton_ops().fused_check_(
            grads, found_inf, inv_scale, norm_type, norm_numels=norm_numels, amax_out=amax_out
        )
    if amax_out is not None and backend != "triton":  # one more pass, read before any unscale
        nonempty = [g for g in grads if g.numel()]
        if nonempty:
            with torch.no_grad():
                group_max = torch.stack(norms(nonempty, math.inf, backend)).amax()
            amax_out.copy_(torch.maximum(amax_out, group_max.to(amax_out.device)))
    total = None
    if norm_type is not None:
        # Read before the check may unscale: the norm is of the values as read.
        counted = _counted(grads, norm_numels)
        with torch.no_grad():
            if counted:
                per_tensor = norms(counted, norm_type, backend)
                total = torch.linalg.vector_norm(torch.stack(per_tensor), norm_type).float()
            else:
                total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    if backend == "triton":  # a norm the fused pass does not take: check without it
        _triton_ops().fused_check_(grads, found_inf, inv_scale, None, amax_out=amax_out)
    else:  # elementwise: once per contiguous span (the Triton table merges spans itself)
        impl = reference if backend == "reference" else torch_ops
        elementwise = spans.coalesce(grads) if coalesced is None else coalesced
        impl.check_and_unscale_(elementwise, found_inf, inv_scale)
    return total
