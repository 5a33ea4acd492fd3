"""Local gradient kernels behind one signature; the backend is chosen per (device, dtype) group.

``check_and_unscale_(grads, found_inf, inv_scale)``: sets ``found_inf`` to 1.0 if any element of
``grads`` is inf/NaN (checked *before* scaling, as torch does) and multiplies ``grads`` in place
by ``inv_scale`` (skipped when ``inv_scale`` is None). ``norms(grads, norm_type)``: per-tensor norms.

Backends: "torch" (torch's multi-tensor AMP op; its CUDA kernel has no bf16, so bf16 on CUDA
falls back to the reference) and "reference" (plain torch ops, the ground truth). "auto" picks
"torch". No backend syncs with the host.
"""

from __future__ import annotations

from typing import Literal

import torch

from distscale.kernels import reference, torch_ops

Kernel = Literal["auto", "torch", "reference"]
KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "reference")

__all__ = ["KERNEL_CHOICES", "Kernel", "check_and_unscale_", "norms"]


def _use_reference(kernel: str, grads: list[torch.Tensor]) -> bool:
    if kernel == "reference":
        return True
    return not torch_ops.supports(grads[0].device, grads[0].dtype)


def check_and_unscale_(
    grads: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | None,
    kernel: str = "auto",
) -> None:
    """Check (and optionally unscale) one (device, dtype) group in place. No host sync."""
    if not grads:
        return
    impl = reference if _use_reference(kernel, grads) else torch_ops
    impl.check_and_unscale_(grads, found_inf, inv_scale)


def norms(grads: list[torch.Tensor], norm_type: float, kernel: str = "auto") -> list[torch.Tensor]:
    """Per-tensor ``norm_type`` norms (float32 for 16-bit grads). No host sync."""
    if not grads:
        return []
    impl = reference if kernel == "reference" else torch_ops
    return impl.norms(grads, norm_type)
