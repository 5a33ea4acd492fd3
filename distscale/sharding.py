"""Which local tensor to read for each gradient, and which of its elements this rank counts.

The overflow check reads every local gradient element (an inf anywhere must be seen). The norm
must count every element of the *global* gradient exactly once across the scaler's group:

* DTensor (FSDP2, HSDP, TP): the local shard; counted on the rank whose coordinate is 0 on every
  mesh axis the placement replicates, so Shard axes are summed and Replicate axes counted once.
* FSDP1 ``FlatParameter``: the local shard minus its padding; replicated (NO_SHARD) flat
  parameters are counted on rank 0 only.
* FSDP1 original params (``use_orig_params=True``): views of a local shard, counted on every
  rank (FULL_SHARD / SHARD_GRAD_OP over the scaler's group).
* Anything else (DDP, single process): a replica, counted on rank 0 of the scaler's group.

Reading DTensor grads through their local shards keeps DTensor's own dispatch (and its
per-bucket found_inf all-reduce) out of the step: the scaler's single collective covers them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["LocalGrad", "local_grads"]


@dataclass(frozen=True, slots=True)
class LocalGrad:
    tensor: torch.Tensor
    """Local storage of the gradient: checked for inf/NaN and unscaled in place."""
    source: torch.Tensor
    """``param.grad`` itself (a DTensor's local view is a new object at every call)."""
    norm_tensor: torch.Tensor | None
    """The elements this rank counts toward the global norm (None: counted elsewhere)."""


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _owns_dtensor(grad: torch.Tensor) -> bool:
    coordinate = grad.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing of this grad
        return False
    for axis, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError(
                "gradient has a Partial placement on mesh axis "
                f"{axis} ({grad.placements}); reduce it before clipping its norm."
            )
        if placement.is_replicate() and coordinate[axis] != 0:
            return False
    return True


def _flat_param_view(param: torch.Tensor, grad: torch.Tensor, rank: int) -> LocalGrad:
    padded = int(getattr(param, "_shard_numel_padded", 0))
    sharded = getattr(param, "_sharded_size", None)
    unsharded = getattr(param, "_unpadded_unsharded_size", None)
    replicated = (
        padded == 0 and sharded is not None and unsharded is not None and sharded.numel() == unsharded.numel()
    )
    counted = grad[: grad.numel() - padded] if padded else grad
    return LocalGrad(grad, grad, counted if (rank == 0 or not replicated) else None)


def local_grads(params: Iterable[torch.Tensor], rank: int) -> list[LocalGrad]:
    """Local gradients of ``params`` (params without a grad are skipped).

    Args:
        params: the optimizer's parameters, in order.
        rank: this rank's index in the scaler's process group (0 when not distributed).

    No host sync, no collective.
    """
    dtensor = _dtensor_type()
    out: list[LocalGrad] = []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if dtensor is not None and isinstance(grad, dtensor):
            local = grad.to_local()
            out.append(LocalGrad(local, grad, local if _owns_dtensor(grad) else None))
            continue
        if grad.is_sparse:
            if grad.dtype is torch.float16 and not grad.is_coalesced():
                # Duplicate indices would overflow when summed later; check the coalesced values.
                param.grad = grad = grad.coalesce()
            values = grad._values()
            out.append(LocalGrad(values, grad, values if rank == 0 else None))
            continue
        # FlatParameter (its instances report type Parameter): shard metadata set for every strategy.
        if hasattr(param, "_unpadded_unsharded_size") and hasattr(param, "_sharded_size"):
            out.append(_flat_param_view(param, grad, rank))
            continue
        fsdp1_orig = getattr(param, "_fsdp_flattened", False)
        out.append(LocalGrad(grad, grad, grad if (fsdp1_orig or rank == 0) else None))
    return out
