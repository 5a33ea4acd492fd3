"""Which ranks hold copies of which parameters: derived where a tensor or wrapper tells, declared
where it cannot, refused otherwise.

A tensor or wrapper describes its parameter only over *its own* ranks: a DTensor over its mesh,
DDP over its process group, FSDP1 over its shard (and, for HYBRID_SHARD, replicate) groups, a
plain tensor over this rank alone. When those ranks are the scaler's whole group, the counting
rule is fully derived. When they are fewer (a pipeline stage's FSDP2 mesh, DDP inside one stage,
a plain tensor anywhere on a multi-rank group), the other ranks of the group may hold copies of
the parameter (data parallelism) or other parts of the model (pipeline stages, tensor or expert
shards), and only the user knows which. They say it the way torch users describe parallelism:

* ``GradScaler(mesh=world_mesh, replicate_dims=("dp",))``: the job's DeviceMesh (its ranks are the
  scaler's group) and the dims over which parameters are copies; every other dim holds different
  parts of the model. A parameter whose own ranks span some dims of the mesh is counted on this
  rank when its own rule counts it and this rank's coordinate is 0 on every *other* dim that
  ``replicate_dims`` names.
* an optimizer param group's ``"replicate_dims"`` entry: the same, for that group's parameters
  (experts replicated over fewer dims than dense layers; tensor-parallel duplicates over more).
* ``GradScaler.register_model(model)``: DDP's and FSDP1's process groups, which their tensors do
  not carry.

A parameter neither derived nor declared is *unresolved*: it is still checked for inf/NaN, but
the first norm that needs it raises :class:`~distscale.ReplicationError` on every rank.
No host sync and no collective here; all of it runs once per parameter list, not per step.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["REPLICATE_DIMS_KEY", "Counting", "Layout", "Owners", "mesh_ranks", "refusal"]

REPLICATE_DIMS_KEY = "replicate_dims"
"""The optimizer param-group entry that declares that group's replicate dims."""

Counting = bool | str
"""True: counted on this rank; False: counted on another rank; a str: unknown, and why."""

_HINT = (
    "HINT: declare the layout: GradScaler(..., mesh=world_mesh, replicate_dims=('dp',)) names the job's "
    "DeviceMesh and the dims over which parameters are copies (() when none are: pure pipeline "
    "parallelism); an optimizer param group's 'replicate_dims' entry overrides it for that group "
    "(experts, tensor-parallel duplicates); scaler.register_model(model) derives it from DDP and FSDP1 "
    "wrappers. The counting rule for every layout is in distscale.sharding's docstring."
)


@dataclass(frozen=True, slots=True)
class Owners:
    """The ranks a tensor or wrapper describes (global ranks, this one included), and whether its
    own rule counts this rank's elements (for a DTensor: whether its placements get a say)."""

    ranks: frozenset[int]
    counted_here: bool


def global_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """The global ranks of ``group`` (the default group when None); ``(0,)`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return (0,)
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


def mesh_ranks(mesh: Any) -> frozenset[int]:
    """The global ranks of a DeviceMesh. Its rank table is a CPU tensor, never on a device: read
    through numpy, which no device sync is involved in (and which host-read counters ignore)."""
    return frozenset(int(r) for r in mesh.mesh.numpy().reshape(-1))


def _check_dims(value: Any, names: tuple[str, ...], what: str) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(d, str) for d in value)
    ):
        raise ValueError(
            f"{what} must be a sequence of mesh dim names such as ('dp',), got {value!r}. "
            f"The mesh's dims are {names}."
        )
    unknown = [d for d in value if d not in names]
    if unknown or len(set(value)) != len(value):
        raise ValueError(
            f"{what} must name distinct dims of the mesh {names}, got {tuple(value)!r}"
            + (f" ({unknown} not among them)" if unknown else " (repeated)")
            + ". HINT: use the mesh_dim_names given to init_device_mesh."
        )
    return tuple(value)


class Layout:
    """What the scaler knows of replication beyond the tensors: the declared mesh and the
    registered wrappers. Built by ``GradScaler.__init__``; validated there (on every rank)."""

    def __init__(
        self,
        mesh: Any | None = None,
        replicate_dims: Sequence[str] | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.mesh = mesh
        self.replicate_dims: tuple[str, ...] = ()
        self._coords: dict[int, tuple[int, ...]] = {}
        self._names: tuple[str, ...] = ()
        self._outside_cache: dict[frozenset[int], tuple[str, ...] | None] = {}
        # id(param) -> (weak reference, owners, counted-here kind is "special"); see register_model.
        self._registered: dict[int, tuple[weakref.ref[torch.Tensor], Owners, bool]] = {}
        self.version = 0  # bumped by register_model: cached classifications go stale
        if mesh is None:
            if replicate_dims is not None:
                raise ValueError(
                    f"replicate_dims={tuple(replicate_dims)!r} names dims of a DeviceMesh, but mesh is None. "
                    "HINT: pass mesh=init_device_mesh(..., mesh_dim_names=(...)) with it."
                )
            return
        self._init_mesh(mesh, replicate_dims, group)

    def _init_mesh(
        self, mesh: Any, replicate_dims: Sequence[str] | None, group: dist.ProcessGroup | None
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(mesh, DeviceMesh):
            raise TypeError(
                f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}. "
                "HINT: mesh=init_device_mesh(device_type, shape, mesh_dim_names=(...))."
            )
        if not mesh.mesh_dim_names:
            raise ValueError(
                f"mesh must have named dims (mesh_dim_names), got an unnamed mesh of shape "
                f"{tuple(mesh.mesh.shape)}. HINT: init_device_mesh(..., mesh_dim_names=('pp', 'dp'))."
            )
        self._names = tuple(mesh.mesh_dim_names)
        if replicate_dims is None:
            raise ValueError(
                f"replicate_dims is required with mesh (dims {self._names}): name the dims over which "
                "parameters are copies, e.g. replicate_dims=('dp',), or () when no dim holds copies."
            )
        self.replicate_dims = _check_dims(replicate_dims, self._names, "replicate_dims")
        table = mesh.mesh.numpy()  # a CPU tensor of global ranks (see mesh_ranks)
        covered = sorted(mesh_ranks(mesh))
        group_ranks = sorted(global_ranks(group))
        if covered != group_ranks:
            raise ValueError(
                f"mesh covers ranks {covered}, but the scaler's process group holds ranks {group_ranks}: "
                "the mesh must describe exactly the ranks that share the skip decision. HINT: pass the "
                "job's whole mesh (not a sub-mesh such as mesh['dp']), or process_group= a group of "
                "exactly the mesh's ranks."
            )
        for coordinate in itertools.product(*(range(n) for n in table.shape)):
            self._coords[int(table[coordinate])] = coordinate

    # ------------------------------------------------------------------ declarations

    def group_dims(self, param_group: Mapping[str, Any]) -> tuple[str, ...] | str:
        """The replicate dims that apply to ``param_group``'s parameters, or why they are unusable."""
        if REPLICATE_DIMS_KEY not in param_group:
            return self.replicate_dims
        value = param_group[REPLICATE_DIMS_KEY]
        if self.mesh is None:
            return (
                f"its param group declares replicate_dims={value!r}, but the scaler has no mesh: pass "
                "GradScaler(..., mesh=world_mesh, replicate_dims=...)"
            )
        try:
            return _check_dims(value, self._names, "the param group's replicate_dims")
        except ValueError as exc:
            return str(exc)

    def register_model(
        self,
        model: torch.nn.Module,
        group_ranks: Iterable[int],
        replicated_over: dist.ProcessGroup | None = None,
    ) -> int:
        """Record what DDP and FSDP1 wrappers inside ``model`` tell about their parameters; with
        ``replicated_over``, first every parameter of ``model`` as a copy over that group (what a
        DDP wrapper that a framework holds, out of reach, would tell).

        Returns how many parameters were registered. Local only (reads process-group ranks).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.nn.parallel import DistributedDataParallel as DDP

        group = frozenset(group_ranks)
        found: dict[int, tuple[torch.Tensor, Owners, bool]] = {}
        if replicated_over is not None:
            owners = _group_owners(replicated_over)
            found.update((id(p), (p, owners, False)) for p in model.parameters())
        # Outer wrappers first, so an inner FSDP1 unit's own groups win for its parameters.
        for module in model.modules():
            if isinstance(module, DDP):
                owners = _group_owners(module.process_group)
                for param in module.module.parameters():
                    if not getattr(param, "_ddp_ignored", False):
                        found[id(param)] = (param, owners, False)
            elif isinstance(module, FSDP):
                for param, owners, special in _fsdp1_owners(module):
                    found[id(param)] = (param, owners, special)
        for _, owners, _ in found.values():
            if not owners.ranks <= group:
                raise ValueError(
                    f"register_model: a wrapper in {type(model).__name__} spans ranks {sorted(owners.ranks)}, "
                    f"outside the scaler's group {sorted(group)}. HINT: the scaler's process_group must "
                    "hold every rank of the model's wrappers."
                )
        for key, (param, owners, special) in found.items():
            self._registered[key] = (weakref.ref(param), owners, special)
        self.version += 1
        return len(found)

    def registered(self, param: torch.Tensor) -> tuple[Owners, bool] | None:
        """(owners, counted through the tensor's own rule) for a registered ``param``, else None."""
        entry = self._registered.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1], entry[2]

    # ------------------------------------------------------------------ the rule

    def resolve(
        self, owners: Owners, dims: tuple[str, ...] | str, group: frozenset[int], me: int, what: str
    ) -> Counting:
        """Whether this rank (global rank ``me``) counts a parameter described by ``owners``.

        ``dims``: the replicate dims that apply to it (``group_dims``); ``what`` names the kind of
        parameter in the reason returned when it cannot be resolved.
        """
        if owners.ranks == group:
            return owners.counted_here
        if not owners.ranks <= group:
            return f"{what} spans ranks {sorted(owners.ranks - group)} outside the scaler's group"
        if isinstance(dims, str):
            return dims
        if self.mesh is None:
            return (
                f"{what} describes ranks {sorted(owners.ranks)} of the scaler's {len(group)}: the others "
                "may hold copies of it or other parts of the model, and no mesh is declared"
            )
        outside = self._outside_dims(owners.ranks, me)
        if outside is None:
            return (
                f"{what} spans ranks {sorted(owners.ranks)}, which are not whole dims of the declared "
                f"mesh {self._names} {tuple(self.mesh.mesh.shape)} through this rank"
            )
        coordinate = self._coords[me]
        replicas_here = all(coordinate[self._names.index(d)] == 0 for d in outside if d in dims)
        return owners.counted_here and replicas_here

    def _outside_dims(self, ranks: frozenset[int], me: int) -> tuple[str, ...] | None:
        # The mesh dims that ``ranks`` do not span; None when ``ranks`` is not the slab of whole
        # dims through this rank (then no declaration in terms of dims can describe it).
        if ranks not in self._outside_cache:
            mine = self._coords[me]
            spanned = {d for d in range(len(mine)) for r in ranks if self._coords[r][d] != mine[d]}
            slab = {
                r
                for r, c in self._coords.items()
                if all(c[d] == mine[d] for d in range(len(mine)) if d not in spanned)
            }
            outside = tuple(n for d, n in enumerate(self._names) if d not in spanned)
            self._outside_cache[ranks] = outside if slab == ranks else None
        return self._outside_cache[ranks]


def _group_owners(group: dist.ProcessGroup, counted: bool | None = None) -> Owners:
    ranks = frozenset(dist.get_process_group_ranks(group))
    return Owners(ranks, dist.get_rank(group) == 0 if counted is None else counted)


def _fsdp1_owners(module: Any) -> list[tuple[torch.Tensor, Owners, bool]]:
    """FSDP1 unit ``module``: (param, owners, special) for the parameters it manages directly."""
    from torch.distributed.fsdp import ShardingStrategy

    strategy = module.sharding_strategy
    shard_group = module.process_group
    if strategy is ShardingStrategy.NO_SHARD:
        owners = _group_owners(shard_group)  # a replica over its group: counted on its rank 0
    elif strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        # Sharded within a node, replicated across nodes: every shard counted on inter-node rank 0.
        replicate_group = module._inter_node_pg
        me = dist.get_rank()
        shard, replicas = (
            dist.get_process_group_ranks(shard_group),
            dist.get_process_group_ranks(replicate_group),
        )
        ranks = frozenset(s + r - me for s in shard for r in replicas)
        owners = Owners(ranks, dist.get_rank(replicate_group) == 0)
    else:  # FULL_SHARD, SHARD_GRAD_OP: each rank counts its own shard
        owners = _group_owners(shard_group, counted=True)
    out: list[tuple[torch.Tensor, Owners, bool]] = []
    for param in module.params:  # what this unit manages (flat parameters, or original ones)
        flat = hasattr(param, "_unpadded_unsharded_size")
        originals = getattr(param, "_params", None) if flat else None
        if originals:  # use_orig_params=True: the optimizer holds the original parameters
            out.extend((p, owners, False) for p in originals)
        out.append((param, owners, flat))
    return out


def refusal(found: Sequence[Sequence[tuple[str, tuple[int, ...], str]]], world: int, limit: int = 10) -> str:
    """The message of the ReplicationError raised on every rank: ``found[rank]`` lists that rank's
    unresolved parameters as (name, shape, why)."""
    entries = [(rank, *entry) for rank, part in enumerate(found) for entry in part]
    lines = [
        f"cannot count {len(entries)} parameter(s) toward the global gradient norm: the scaler's group has "
        f"{world} ranks, and for these it cannot tell which ranks hold copies (counted once) and which hold "
        "other parts of the model (pipeline stages, tensor or expert shards: each counted). Counting them on "
        "one rank would drop the other parts; on every rank, count copies several times."
    ]
    for rank, name, shape, why in entries[:limit]:
        lines.append(f"  rank {rank}: {name} {list(shape)}: {why}")
    if len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    lines.append(_HINT)
    return "\n".join(lines)
