"""Plain-torch ground truth for the local check: obviously correct, one tensor at a time."""

from __future__ import annotations

import torch


def check_and_unscale_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor | None
) -> None:
    for grad in grads:
        if grad.numel() == 0:
            continue
        # Checked before scaling: a finite value that overflows when unscaled is not an overflow
        # of the backward pass (torch's kernel makes the same choice).
        non_finite = (~torch.isfinite(grad)).any()
        found_inf.copy_(torch.maximum(found_inf, non_finite.to(found_inf.dtype)))
        if inv_scale is not None:
            opmath = torch.promote_types(grad.dtype, torch.float32)
            grad.copy_((grad.to(opmath) * inv_scale.to(opmath)).to(grad.dtype))


def norms(grads: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(g.float(), norm_type) for g in grads]
