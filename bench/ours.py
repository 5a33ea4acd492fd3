"""distscale's rows: the local check through :mod:`distscale.kernels`, in its two modes.

- ``inplace``: check + unscale in place + norm (for optimizers that read plain gradients).
- ``readonly``: check + norm without writing (``inv_scale=None``: the unscale is folded into a
  fused optimizer's ``grad_scale``).

Both call ``kernels.check_(grads, found_inf, inv_scale, norm_type, backend=...)`` once per
(device, dtype) group, the backend resolved from the kernel choice for the group (one pass with
Triton; the norm is of the values as read, before unscale). On CUDA there are rows per kernel:
"auto", "triton" (when it runs) and "torch"; on CPU "auto" only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench import traffic
from bench.impl import Context, Impl, Outcome, Run, Scale, group_by_dtype
from distscale import kernels

__all__ = ["api_name", "kernel_names", "ours", "triton_available"]

NORM_TYPE = 2.0


def api_name() -> str:
    """Which kernels API the distscale rows call (reported with the results)."""
    return "kernels.check_"


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``kernel="triton"`` rows can run here, and why not."""
    if device.type != "cuda":
        return False, "no CUDA device"
    try:
        probe = [torch.ones(8, device=device)]
        _group_norm(probe, torch.zeros((), device=device), None, "triton")
        torch.cuda.synchronize(device)
    except Exception as exc:
        return False, f"kernel='triton' failed: {type(exc).__name__}: {exc}"
    return True, ""


def _group_norm(
    grads: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor | None, kernel: str
) -> torch.Tensor:
    backend = kernels.backend(kernel, grads[0].device, grads[0].dtype)
    norm = kernels.check_(grads, found, inv, NORM_TYPE, backend=backend)
    assert norm is not None
    return norm


def _builder(kernel: str, inplace: bool) -> Callable[[list[torch.Tensor], Context], Run]:
    def build(grads: list[torch.Tensor], ctx: Context) -> Run:
        def run(scale: Scale) -> Outcome:
            found = torch.zeros((), dtype=torch.float32, device=ctx.device)
            norms = [
                _group_norm(group, found, scale.inv if inplace else None, kernel)
                for group in group_by_dtype(grads)
            ]
            total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), NORM_TYPE)
            return Outcome(found, total)

        return run

    return build


def _inplace_factor(ref: float, inv: float, max_norm: float) -> float:
    return inv


def _readonly_factor(ref: float, inv: float, max_norm: float) -> float:
    return 1.0


def kernel_names(device: torch.device) -> list[str]:
    """Kernels with rows: "auto" everywhere; on CUDA also "triton" (when it runs) and "torch"."""
    if device.type != "cuda":
        return ["auto"]  # on CPU, "auto" is "torch"
    return ["auto", "triton", "torch"] if triton_available(device)[0] else ["auto", "torch"]


def _resolved(kernel: str, device: torch.device) -> str:
    if kernel != "auto":
        return f"kernel={kernel}"
    return f"kernel=auto (fp32 → {kernels.backend('auto', device, torch.float32)})"


def ours(names: list[str], device: torch.device) -> list[Impl]:
    """The distscale rows for each kernel in ``names`` ("auto" is named without suffix)."""
    how = api_name()
    impls = []
    for kernel in names:
        suffix = "" if kernel == "auto" else f"-{kernel}"
        which = f"{how}, {_resolved(kernel, device)}"
        impls += [
            Impl(f"distscale-inplace{suffix}", f"distscale check + unscale + norm, {which}",
                 "distscale", "inplace", True, "scaled", traffic.in_place, _inplace_factor,
                 _builder(kernel, True)),
            Impl(f"distscale-readonly{suffix}", f"distscale check + norm (folded unscale), {which}",
                 "distscale", "readonly", False, "scaled", traffic.read_only, _readonly_factor,
                 _builder(kernel, False)),
        ]  # fmt: skip
    return impls
