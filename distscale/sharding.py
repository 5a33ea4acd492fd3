"""Which local tensor to read for each gradient, and which of its elements this rank counts.

The overflow check reads every local gradient element (an inf anywhere must be seen), whatever
the layout. The norm must count every element of the *global* gradient exactly once across the
scaler's group. The counting rule, by layout ("derived": from tensors or wrappers; "declared":
``GradScaler(mesh=..., replicate_dims=...)`` or a param group's ``"replicate_dims"``; see
:mod:`distscale.layout`):

===========================================  ===================  ==========================================
layout                                       known from           counted on
===========================================  ===================  ==========================================
one process, or a group of one rank          trivially            this rank
DTensor on a mesh of the whole group         placements           Shard axes summed; Replicate axes on
(FSDP2, HSDP, FSDP2+TP, DTensor experts)                          coordinate 0 only
DTensor on a sub-mesh (PP x FSDP2, experts   placements +         as above, and on coordinate 0 of every
on an expert sub-mesh)                       declared dims        declared replicate dim outside its mesh
FSDP1 FlatParameter, FULL_SHARD or           the flat param's     every rank, its shard minus the padding
SHARD_GRAD_OP over the whole group           sizes
FSDP1 (original params, NO_SHARD,            register_model       shards: every rank (HYBRID: inter-node
HYBRID_SHARD, a sub-group)                                        rank 0); NO_SHARD: its group's rank 0
DDP over the whole group                     register_model       rank 0 of DDP's group
DDP over a sub-group (PP x DDP)              register_model +     DDP rank 0, on coordinate 0 of declared
                                             declared dims        replicate dims outside DDP's group
plain tensor: pipeline stage, Megatron-      declared dims        coordinate 0 of every replicate dim
style tensor-parallel shard or duplicate,                         (other dims: every coordinate)
expert as a plain tensor
anything else on a group of several ranks    --                   refused: ReplicationError on every rank at
                                                                  the first norm (inf/NaN still checked)
===========================================  ===================  ==========================================

A Partial DTensor gradient is refused (it must be reduced first). Reading DTensor grads through
their local shards keeps DTensor's own dispatch (and its per-bucket found_inf all-reduce) out of
the step: the scaler's single collective covers them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from distscale.layout import Layout, Owners, mesh_ranks

__all__ = [
    "COUNTED",
    "DTENSOR_NOT_OWNED",
    "DTENSOR_OWNED",
    "ELSEWHERE",
    "SPECIAL",
    "UNRESOLVED",
    "Classification",
    "LocalGrad",
    "classify",
    "local_grads",
]


class LocalGrad(NamedTuple):
    # A NamedTuple, not a dataclass: one is built per gradient per step, and tuples build fastest.
    tensor: torch.Tensor
    """Local storage of the gradient: checked for inf/NaN and unscaled in place."""
    source: torch.Tensor
    """``param.grad`` itself (a DTensor's local view is a new object at every call)."""
    norm_tensor: torch.Tensor | None
    """The elements this rank counts toward the global norm (None: counted elsewhere, or unknown)."""


# How a parameter's grad counts here (decided once per parameter list, see ``classify``):
# COUNTED: every local element; ELSEWHERE: none (another rank counts them); SPECIAL: by the
# tensor's own rule, read per step (FlatParameter padding, sparse values); UNRESOLVED: none, and
# nobody knows who does (the first norm raises). DTENSOR_OWNED / DTENSOR_NOT_OWNED: a DTensor the
# rule counts by placements, which the parameter's own placements give (this rank's shard counted,
# or held by a replica); a grad whose placements differ from its parameter's is read per step.
COUNTED, ELSEWHERE, SPECIAL, UNRESOLVED, DTENSOR_OWNED, DTENSOR_NOT_OWNED = 0, 1, 2, 3, 4, 5
_BY_OWN_RULE = (SPECIAL, DTENSOR_OWNED, DTENSOR_NOT_OWNED)
_STRIDED = torch.strided


@dataclass(slots=True)
class Classification:
    """One optimizer's parameters, classified: ``kinds[i]`` for its i-th parameter (flat order)."""

    kinds: list[int]
    unresolved: list[tuple[int, int, str]] = field(default_factory=list)
    """(param group index, index in the group, why) of each UNRESOLVED parameter."""
    verified: bool = False
    """Whether a collective already showed that no rank holds an unresolved parameter."""
    uniform: int | None = None
    """The kind shared by every parameter when all are plain tensors (the lean path of GradSet), else None."""


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_flat_param(param: torch.Tensor) -> bool:
    # FlatParameter instances report type Parameter; its shard metadata is set for every strategy.
    return hasattr(param, "_unpadded_unsharded_size") and hasattr(param, "_sharded_size")


def _flat_param_owners(param: torch.Tensor, group: frozenset[int]) -> Owners | str:
    # FSDP1 pads the flat parameter to a multiple of its group's size and gives each rank one
    # equal shard, so padded / shard is the size of FSDP1's group: the group is the scaler's only
    # when that is the scaler's size (NO_SHARD, HYBRID_SHARD and sub-groups need register_model).
    sharded = param._sharded_size.numel()  # type: ignore[attr-defined]
    padded = getattr(param, "_padded_unsharded_size", None)
    if padded is not None and sharded and sharded != param._unpadded_unsharded_size.numel():  # type: ignore[attr-defined]
        if padded.numel() == sharded * len(group):
            return Owners(group, True)
        return f"an FSDP1 FlatParameter sharded over {padded.numel() // sharded} of the group's {len(group)} ranks"
    return "an FSDP1 FlatParameter that is not sharded (NO_SHARD): a replica over a process group it does not name"


def classify(
    param_groups: Sequence[Mapping[str, Any]], layout: Layout, group: frozenset[int], me: int
) -> Classification:
    """Classify every parameter of ``param_groups`` for the scaler's ``group`` (global ranks) as
    seen from global rank ``me``. Local only; runs once per parameter list."""
    dtensor = _dtensor_type()
    out = Classification([])
    ranks_of: dict[int, frozenset[int]] = {}  # id(mesh) -> its ranks: meshes are shared by many params
    for g, param_group in enumerate(param_groups):
        dims = layout.group_dims(param_group)
        for i, param in enumerate(param_group["params"]):
            owners: Owners | str
            registered = layout.registered(param)
            special = False
            is_dtensor = dtensor is not None and isinstance(param, dtensor)
            if is_dtensor:
                mesh = param.device_mesh
                if id(mesh) not in ranks_of:
                    ranks_of[id(mesh)] = mesh_ranks(mesh)
                owners, special, what = Owners(ranks_of[id(mesh)], True), True, "a DTensor"
            elif len(group) == 1:  # nothing to share with: every local element counts here
                owners, special, what = Owners(group, True), _is_flat_param(param), "a tensor"
            elif registered is not None:
                (owners, special), what = registered, "a wrapped parameter"
            elif _is_flat_param(param):
                owners, special, what = _flat_param_owners(param, group), True, "an FSDP1 FlatParameter"
            elif getattr(param, "_fsdp_flattened", False):
                owners = "an FSDP1 parameter (use_orig_params=True) whose process group it does not name"
                what = "an FSDP1 parameter"
            else:
                owners, what = Owners(frozenset((me,)), True), "a plain tensor"
            counting = owners if isinstance(owners, str) else layout.resolve(owners, dims, group, me, what)
            if isinstance(counting, str):
                out.kinds.append(UNRESOLVED)
                out.unresolved.append((g, i, counting))
            elif not counting:
                out.kinds.append(ELSEWHERE)
            elif is_dtensor:
                out.kinds.append(DTENSOR_OWNED if _owns_dtensor(param) else DTENSOR_NOT_OWNED)
            else:
                out.kinds.append(SPECIAL if special else COUNTED)
    kinds = set(out.kinds)
    out.uniform = next(iter(kinds)) if len(kinds) == 1 and kinds.isdisjoint(_BY_OWN_RULE) else None
    return out


def local_grads(
    params: Sequence[torch.Tensor], kinds: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Local gradients of ``params`` (params without a grad are skipped), as three aligned lists:
    the local tensors (checked and unscaled in place), the ``param.grad`` objects, and the elements
    this rank counts toward the norm (None: counted elsewhere, or unknown).

    Args:
        params: the optimizer's parameters, in order.
        kinds: their ``classify(...).kinds`` (known before: this runs per step).

    No host sync, no collective.
    """
    tensors: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    counted: list[torch.Tensor | None] = []
    dtensor = _dtensor_type()
    for param, kind in zip(params, kinds, strict=True):
        grad = param.grad
        if grad is None:
            continue
        # The common cases, in as few Python operations as possible (thousands of grads per step).
        if kind < SPECIAL and type(grad) is torch.Tensor and grad.layout is _STRIDED:
            local, norm = grad, grad if kind == COUNTED else None
        elif (
            kind >= DTENSOR_OWNED
            and type(grad) is dtensor
            and grad.device_mesh is param.device_mesh  # type: ignore[attr-defined]
            and grad.placements == param.placements  # type: ignore[attr-defined]
        ):
            # The local shard itself: to_local() is an autograd function (~4 us a call).
            local = grad._local_tensor  # type: ignore[attr-defined]
            norm = local if kind == DTENSOR_OWNED else None
        else:
            local, _, norm = _special(param, grad, kind)
        tensors.append(local)
        sources.append(grad)
        counted.append(norm)
    return tensors, sources, counted


def _owns_dtensor(grad: Any) -> bool:
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


def _special(param: torch.Tensor, grad: torch.Tensor, kind: int) -> LocalGrad:
    counted = kind == COUNTED or kind in _BY_OWN_RULE
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(grad, dtensor):
        # The local shard itself (to_local() is an autograd function): read and written in place.
        local = grad._local_tensor  # type: ignore[attr-defined]  # DTensor, imported lazily
        return LocalGrad(local, grad, local if counted and _owns_dtensor(grad) else None)
    if grad.is_sparse:
        if grad.dtype is torch.float16 and not grad.is_coalesced():
            # Duplicate indices would overflow when summed later; check the coalesced values.
            param.grad = grad = grad.coalesce()
        values = grad._values()
        return LocalGrad(values, grad, values if counted else None)
    if kind == SPECIAL and _is_flat_param(param):
        padded = int(getattr(param, "_shard_numel_padded", 0))
        return LocalGrad(grad, grad, grad[: grad.numel() - padded] if padded else grad)
    return LocalGrad(grad, grad, grad if counted else None)
