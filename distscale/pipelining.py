"""Loss scaling inside ``torch.distributed.pipelining`` schedules.

A schedule calls ``loss_fn(output, target)`` on the last stage and runs backward itself, so the
loss never passes through ``scaler.scale(loss)``. ``GradScaler.scale_loss_fn(loss_fn)`` wraps it:
the wrapped function returns the loss *unscaled* (what the schedule hands back in ``losses``, and
what you log), and its backward starts from the scale instead of 1. Every stage's gradients are
then exactly those of ``scaler.scale(loss).backward()``: the gradient reaching the loss is the
scale, as the product's backward gives it, and flows on through the schedule's sends and receives.

Microbatch gradients accumulate in ``.grad`` at one scale (it changes only in ``update()``), so
accumulation is exact: nothing rescales what was accumulated. The schedule's own division by the
number of microbatches (``scale_grads=True``) comes after and is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ScaledLossFn", "scale_gradient"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return loss.clone()  # a new tensor: autograd's custom functions must not return inputs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # As the backward of ``loss * scale``: grad * scale, in the type promotion of that product.
        return grad * ctx.scale.to(grad.device, non_blocking=True), None


def scale_gradient(loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``loss``'s value, with gradients multiplied by ``scale`` on their way back. No host sync."""
    return _ScaleGradient.apply(loss, scale)


class ScaledLossFn:
    """``loss_fn`` whose loss keeps its value and whose backward is scaled by ``scale`` (read at
    every call: the scaler updates it in place). ``scale=None``: a disabled scaler, ``loss_fn``.
    Only the last stage computes losses: the step's loss is the mean over the ranks that did."""

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        scale: torch.Tensor | None,
        observe: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__} {loss_fn!r}.")
        self.loss_fn = loss_fn
        self.scale = scale
        self.observe = observe  # sees each loss (the scaler's loss rules), as scale(loss) would

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = self.loss_fn(*args, **kwargs)
        if self.observe is not None and loss.numel() == 1:
            self.observe(loss)
        return loss if self.scale is None else scale_gradient(loss, self.scale)

    def __repr__(self) -> str:
        return f"ScaledLossFn({self.loss_fn!r})"
