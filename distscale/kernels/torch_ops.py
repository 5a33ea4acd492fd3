"""torch's private multi-tensor ops, kept behind this one module so a torch change touches one file."""

from __future__ import annotations

import torch


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._amp_foreach_non_finite_check_and_unscale_`` handles this group."""
    # The CUDA kernel dispatches float/double/half only (pytorch#127176); CPU also has bf16.
    return not (device.type == "cuda" and dtype is torch.bfloat16)


def check_and_unscale_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor | None
) -> None:
    # inv_scale=1 still rewrites every element (torch's fused-optimizer check does the same);
    # the read-only Triton kernel removes that write.
    if inv_scale is None:
        inv_scale = torch.ones((), dtype=torch.float32, device=found_inf.device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def norms(grads: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    # Accumulate 16-bit grads in float32: a scaled fp16 gradient's norm easily exceeds 65504.
    dtype = torch.float32 if grads[0].dtype in (torch.float16, torch.bfloat16) else None
    return list(torch._foreach_norm(grads, norm_type, dtype=dtype))
