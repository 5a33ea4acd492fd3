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

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["LocalGrad", "ParamKinds", "local_grads", "param_kinds"]


class LocalGrad(NamedTuple):
    # A NamedTuple, not a dataclass: one is built per gradient per step, and tuples build fastest.
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


# What a parameter is, which decides how its grad is read: a plain tensor (whose grad is read as
# is, counted toward the norm on rank 0 or, for FSDP1's original params, everywhere) or anything
# that needs a closer look at every step (DTensor, FlatParameter; sparse grads are found per step).
_PLAIN_COUNTED, _PLAIN_ELSEWHERE, _SPECIAL = 0, 1, 2
_STRIDED = torch.strided
_new_tuple = tuple.__new__
ParamKinds = list[int]


def param_kinds(params: Sequence[torch.Tensor], rank: int) -> ParamKinds:
    """Classify ``params`` once; :func:`local_grads` reuses it while the parameter list is the same."""
    dtensor = _dtensor_type()
    kinds = []
    for param in params:
        if (dtensor is not None and isinstance(param, dtensor)) or (
            hasattr(param, "_unpadded_unsharded_size") and hasattr(param, "_sharded_size")
        ):
            kinds.append(_SPECIAL)
        elif rank == 0 or getattr(param, "_fsdp_flattened", False):
            kinds.append(_PLAIN_COUNTED)
        else:
            kinds.append(_PLAIN_ELSEWHERE)
    return kinds


def local_grads(
    params: Sequence[torch.Tensor], rank: int, kinds: ParamKinds | None = None
) -> list[LocalGrad]:
    """Local gradients of ``params`` (params without a grad are skipped).

    Args:
        params: the optimizer's parameters, in order.
        rank: this rank's index in the scaler's process group (0 when not distributed).
        kinds: ``param_kinds(params, rank)``, if already known (it is per step: this runs per step).

    No host sync, no collective.
    """
    if kinds is None:
        kinds = param_kinds(params, rank)
    out: list[LocalGrad] = []
    for param, kind in zip(params, kinds, strict=True):
        grad = param.grad
        if grad is None:
            continue
        # The common case, in as few Python operations as possible (thousands of grads per step):
        # tuple.__new__ skips the NamedTuple's Python-level __new__.
        if kind != _SPECIAL and type(grad) is torch.Tensor and grad.layout is _STRIDED:
            out.append(_new_tuple(LocalGrad, (grad, grad, grad if kind == _PLAIN_COUNTED else None)))
        else:
            out.append(_special(param, grad, rank))
    return out


def _special(param: torch.Tensor, grad: torch.Tensor, rank: int) -> LocalGrad:
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(grad, dtensor):
        local = grad.to_local()
        return LocalGrad(local, grad, local if _owns_dtensor(grad) else None)
    if grad.is_sparse:
        if grad.dtype is torch.float16 and not grad.is_coalesced():
            # Duplicate indices would overflow when summed later; check the coalesced values.
            param.grad = grad = grad.coalesce()
        values = grad._values()
        return LocalGrad(values, grad, values if rank == 0 else None)
    # FlatParameter (its instances report type Parameter): shard metadata set for every strategy.
    if hasattr(param, "_unpadded_unsharded_size") and hasattr(param, "_sharded_size"):
        return _flat_param_view(param, grad, rank)
    fsdp1_orig = getattr(param, "_fsdp_flattened", False)
    return LocalGrad(grad, grad, grad if (fsdp1_orig or rank == 0) else None)
