"""The local check: one pass per (device, dtype) group, no collective, no host sync.

``GradSet`` gathers one optimizer's local gradients once (see :mod:`distscale.sharding`) and
remembers which tensors it saw and their version counters, so the façade can tell whether the
gradients changed (another backward, ``zero_grad``) since they were checked.

With the "triton" backend on every group, a check that is told the norm type takes the local norm
in the same pass (see :func:`distscale.kernels.fused_check_`) and ``local_norm`` returns it while
the grads are unchanged; the other backends keep their separate norm pass, bit for bit.
"""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict
from typing import Any, Protocol

import torch

from distscale import kernels
from distscale.layout import REPLICATE_DIMS_KEY, Layout
from distscale.sharding import Classification, LocalGrad, classify, local_grads

__all__ = ["GradCache", "GradSet", "GroupRanks"]

GroupKey = tuple[torch.device, torch.dtype]


def _group(tensors: list[torch.Tensor]) -> dict[GroupKey, list[torch.Tensor]]:
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def _group_grads(grads: list[LocalGrad]) -> dict[GroupKey, list[LocalGrad]]:
    groups: dict[GroupKey, list[LocalGrad]] = defaultdict(list)
    for g in grads:
        groups[(g.tensor.device, g.tensor.dtype)].append(g)
    return groups


def _counted_numel(g: LocalGrad) -> int | None:
    """How many leading elements of ``g.tensor`` count toward the norm (None: not a prefix)."""
    if g.norm_tensor is None:
        return 0
    if g.norm_tensor is g.tensor:
        return g.tensor.numel()
    nt, t = g.norm_tensor, g.tensor
    # FSDP1 flat params count their shard minus the padding: a contiguous prefix view.
    if nt.data_ptr() == t.data_ptr() and nt.is_contiguous() and t.is_contiguous() and nt.numel() <= t.numel():
        return nt.numel()
    return None


class _PerDevice:
    """Lazily copies one 0-dim tensor to each device that needs it (non-blocking)."""

    def __init__(self, master: torch.Tensor) -> None:
        self.master = master
        self._copies: dict[torch.device, torch.Tensor] = {master.device: master}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.master.to(device, non_blocking=True)
        return self._copies[device]

    def values(self) -> list[torch.Tensor]:
        return list(self._copies.values())


class GroupRanks(Protocol):
    """Where the scaler's group is (a :class:`~distscale.collectives.ReduceGroup`)."""

    @property
    def global_ranks(self) -> tuple[int, ...]: ...
    @property
    def global_rank(self) -> int: ...


class _SingleProcess:
    global_ranks = (0,)
    global_rank = 0


class GradCache:
    """Per optimizer, the classification of its parameters (see :func:`~distscale.sharding.classify`),
    reused while its parameter list holds the same objects and the layout has not changed:
    classifying costs attribute lookups per parameter that would otherwise repeat every step.

    Gradients themselves are never cached across steps: holding the last step's tensors would keep
    them alive after ``zero_grad(set_to_none=True)``, a whole extra set of gradients in memory.
    """

    def __init__(self, layout: Layout | None = None, group: GroupRanks | None = None) -> None:
        self.layout = Layout() if layout is None else layout
        self.group: GroupRanks = _SingleProcess() if group is None else group
        self._entries: weakref.WeakKeyDictionary[
            torch.optim.Optimizer, tuple[list[torch.Tensor], tuple[Any, ...], Classification]
        ]
        self._entries = weakref.WeakKeyDictionary()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (GradCache, ())  # a cache: pickles empty (weak references do not pickle)

    def classification(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Classification:
        key = (self.layout.version, *(g.get(REPLICATE_DIMS_KEY) for g in optimizer.param_groups))
        entry = self._entries.get(optimizer)
        if entry is not None:
            old, old_key, found = entry
            if old_key == key and len(old) == len(params) and all(map(operator.is_, old, params)):
                return found
        group = frozenset(self.group.global_ranks)
        found = classify(optimizer.param_groups, self.layout, group, self.group.global_rank)
        self._entries[optimizer] = (params, key, found)
        return found


class GradSet:
    """One optimizer's local gradients, as seen at one moment."""

    def __init__(self, optimizer: torch.optim.Optimizer, cache: GradCache | None = None) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.classification = (GradCache() if cache is None else cache).classification(optimizer, params)
        self.param_groups = optimizer.param_groups  # to name unresolved parameters
        self.grads: list[LocalGrad] = local_grads(params, self.classification.kinds)
        self._sources = [g.source for g in self.grads]
        self._groups: dict[GroupKey, list[LocalGrad]] | None = None
        self._versions = self._snapshot()
        # (norm_type, local norm of the current values) from a fused check; None when stale.
        self._fused_norm: tuple[float, torch.Tensor] | None = None

    def unresolved_flag(self, device: torch.device) -> torch.Tensor:
        """1.0 if this rank holds parameters whose counting rule is unknown, else 0.0 (0-dim)."""
        return torch.full((), float(bool(self.classification.unresolved)), device=device)

    def _snapshot(self) -> list[int]:
        # A local view shares its base's version counter, so the stored tensors see later writes.
        return [g.tensor._version for g in self.grads]

    def refresh_versions(self) -> None:
        """Record our own in-place writes, so they do not count as a change."""
        self._versions = self._snapshot()

    def groups(self) -> dict[GroupKey, list[LocalGrad]]:
        """The grads by (device, dtype), computed once: a GradSet's tensors never change."""
        if self._groups is None:
            self._groups = _group_grads(self.grads)
        return self._groups

    def _same_objects(self, optimizer: torch.optim.Optimizer) -> bool:
        current = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return len(current) == len(self._sources) and all(map(operator.is_, current, self._sources))

    def unchanged_since(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s grads are still exactly the tensors and versions checked.

        Reads only ``param.grad`` identities and version counters: no sharding work, no sync.
        """
        return self._same_objects(optimizer) and self._snapshot() == self._versions

    def check_(
        self,
        found_inf: torch.Tensor,
        inv_scale: torch.Tensor | None,
        kernel: str,
        check: bool = True,
        norm_type: float | None = None,
    ) -> None:
        """Accumulate this rank's inf/NaN flag into ``found_inf`` and unscale if ``inv_scale``.

        ``check=False`` only unscales (the grads were checked before and have not changed).
        ``norm_type``: the norm ``local_norm`` will be asked for; taken in the same pass when every
        group runs on the "triton" backend and it is 2 or inf (ignored otherwise).
        Runs one kernel call per (device, dtype) group; no host sync.
        """
        self._fused_norm = None
        groups = self.groups()
        fuse = (
            check
            and norm_type in kernels.FUSED_NORM_TYPES
            and all(kernels.backend(kernel, *key) == "triton" for key in groups)
        )
        counts = (
            {key: [_counted_numel(g) for g in members] for key, members in groups.items()} if fuse else {}
        )
        fuse = fuse and all(None not in c for c in counts.values())
        group_norms: list[torch.Tensor] = []
        with torch.no_grad():
            found = _PerDevice(found_inf)
            inv = None if inv_scale is None else _PerDevice(inv_scale)
            for (device, dtype), members in groups.items():
                tensors = [g.tensor for g in members]
                target = found.get(device) if check else torch.zeros_like(found.get(device))
                inv_here = None if inv is None else inv.get(device)
                if fuse:
                    norm = kernels.fused_check_(
                        tensors, target, inv_here, norm_type, kernel, norm_numels=counts[(device, dtype)]
                    )
                    assert norm is not None
                    group_norms.append(norm.to(found_inf.device))
                else:
                    kernels.check_and_unscale_(tensors, target, inv_here, kernel)
            for copy in found.values():
                if copy is not found_inf:
                    found_inf.copy_(torch.maximum(found_inf, copy.to(found_inf.device)))
            if fuse:
                assert norm_type is not None
                total = (
                    torch.linalg.vector_norm(torch.stack(group_norms), norm_type)
                    if group_norms
                    else torch.zeros((), dtype=torch.float32, device=found_inf.device)
                )
                # The pass read the values before unscaling them: the grads now hold total * inv.
                self._fused_norm = (
                    norm_type,
                    total if inv_scale is None else total * inv_scale.to(total.device),
                )
        # torch's op rewrites every element even with inv_scale=1: our own writes are no change.
        self.refresh_versions()

    def local_norm(
        self, norm_type: float, device: torch.device, kernel: str, scale_by: torch.Tensor | None
    ) -> torch.Tensor:
        """This rank's share of the global norm, as a 0-dim float32 norm (not a power).

        Per-tensor norms are stacked and normed again, in (device, dtype) group order, which is
        exactly what ``torch.nn.utils.clip_grad_norm_`` computes on one process.
        ``scale_by`` multiplies the result (``inv_scale`` when the grads are still scaled).
        """
        if (
            self._fused_norm is not None
            and self._fused_norm[0] == norm_type
            and self._snapshot() == self._versions
        ):
            total = self._fused_norm[1].to(device)
            return (total if scale_by is None else total * scale_by.to(device)).float()
        # Empty shards contribute nothing (and torch's inf-norm refuses them).
        counted = [g.norm_tensor for g in self.grads if g.norm_tensor is not None and g.norm_tensor.numel()]
        per_tensor: list[torch.Tensor] = []
        with torch.no_grad():
            for tensors in _group(counted).values():
                per_tensor.extend(n.to(device) for n in kernels.norms(tensors, norm_type, kernel))
            if not per_tensor:
                return torch.zeros((), dtype=torch.float32, device=device)
            total = torch.linalg.vector_norm(torch.stack(per_tensor), norm_type)
            if scale_by is not None:
                total = total * scale_by.to(device)
        return total.float()

    def tensors(self) -> list[torch.Tensor]:
        return [g.tensor for g in self.grads]

    def mul_(self, factor: torch.Tensor) -> None:
        """Multiply every local grad by ``factor`` in place (the clip), grouped by (device, dtype)
        like ``torch.nn.utils.clip_grad_norm_`` so results match it bitwise. No host sync."""
        self._fused_norm = None
        with torch.no_grad():
            for (device, _), members in self.groups().items():
                torch._foreach_mul_([g.tensor for g in members], factor.to(device))
        self.refresh_versions()
