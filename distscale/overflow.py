"""The local check: one pass per (device, dtype) group, no collective, no host sync.

``GradSet`` gathers one optimizer's local gradients once (see :mod:`distscale.sharding`), groups
them by (device, dtype) with each group's kernel backend resolved once, and remembers which tensors
it saw and their version counters, so the step engine can tell whether the gradients changed
(another backward, ``zero_grad``) since they were checked.

The lean per-step path: when an optimizer's grads are, object for object, the live tensors of its
previous step (DDP's bucket views, a flat buffer, ``zero_grad(set_to_none=False)``) at the same
addresses, the grouping, the kernel backend and the span plan of that step are reused. That check
reads each ``param.grad``, compares it with a weak reference (nothing is kept alive) and reads its
data pointer: three C-level passes, no per-gradient Python.

With the "triton" backend on every group, a check that is told the norm type takes the local norm
in the same pass (see :func:`distscale.kernels.check_`) and ``local_norm`` returns it while the
grads are unchanged; the other backends keep their separate norm pass, bit for bit.
"""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, NamedTuple, Protocol

import torch

from distscale import kernels
from distscale.kernels import spans
from distscale.layout import REPLICATE_DIMS_KEY, Layout
from distscale.sharding import COUNTED, Classification, LocalGrad, classify, local_grads

__all__ = ["ClassificationCache", "GradSet", "GroupRanks", "group_by_device_and_dtype"]

GroupKey = tuple[torch.device, torch.dtype]


def group_by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[GroupKey, list[torch.Tensor]]:
    """``tensors`` split by (device, dtype), in order: one kernel call per group."""
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


class _Group(NamedTuple):
    """One (device, dtype) group of local grads and the kernel backend that runs it."""

    indices: Sequence[int]  # positions in the GradSet's lists
    tensors: list[torch.Tensor]
    backend: kernels.Backend
    span_plan: spans.SpanPlan | None  # how ``tensors`` coalesce for elementwise work

    def coalesced(self) -> list[torch.Tensor]:
        """``tensors`` with each contiguous run as one view (see :mod:`distscale.kernels.spans`)."""
        return spans.apply(self.tensors, self.span_plan)


def _counted_numel(t: torch.Tensor, nt: torch.Tensor | None) -> int | None:
    """How many leading elements of ``t`` count toward the norm (``nt``: the counted elements;
    None: not a prefix)."""
    if nt is None:
        return 0
    if nt is t:
        return t.numel()
    # FSDP1 flat params count their shard minus the padding: a contiguous prefix view.
    if nt.data_ptr() == t.data_ptr() and nt.is_contiguous() and t.is_contiguous() and nt.numel() <= t.numel():
        return nt.numel()
    return None


_TYPE_OF, _LAYOUT_OF = type, operator.attrgetter("layout")
_DEVICE_OF, _DTYPE_OF = operator.attrgetter("device"), operator.attrgetter("dtype")
_VERSION_OF = operator.attrgetter("_version")
_GRAD_OF = operator.attrgetter("grad")
_LOCAL_OF = operator.attrgetter("_local_tensor")  # a DTensor's shard on this rank
_DATA_PTR_OF = torch.Tensor.data_ptr
_NUMEL_OF = torch.Tensor.numel
_PLAIN_TYPES, _STRIDED = {torch.Tensor}, {torch.strided}


def _all_plain(tensors: list[torch.Tensor]) -> bool:
    # Per tensor a C-level map step each: the check costs two attribute reads, not a Python loop.
    return set(map(_TYPE_OF, tensors)) <= _PLAIN_TYPES and set(map(_LAYOUT_OF, tensors)) <= _STRIDED


class _PerDevice:
    """Lazily copies one 0-dim tensor to each device that needs it (non-blocking)."""

    def __init__(self, master: torch.Tensor) -> None:
        self.master = master
        self._copies: dict[torch.device, torch.Tensor] = {master.device: master}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.master.to(device, non_blocking=True)
        return self._copies[device]

    def max_into_master(self) -> None:
        """Fold the other devices' copies into the master with a maximum (flags, amax)."""
        for copy in self._copies.values():
            if copy is not self.master:
                self.master.copy_(torch.maximum(self.master, copy.to(self.master.device)))


class GroupRanks(Protocol):
    """Where the scaler's group is (a :class:`~distscale.collectives.ReduceGroup`)."""

    @property
    def global_ranks(self) -> tuple[int, ...]: ...
    @property
    def global_rank(self) -> int: ...


class _SingleProcess:
    global_ranks = (0,)
    global_rank = 0


def _local_or_none(grad: torch.Tensor) -> torch.Tensor | None:
    return getattr(grad, "_local_tensor", None)


def _no_grad() -> None:
    return None  # stands for a weak reference where a parameter had no grad


_Lists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]


class _LastGrads(NamedTuple):
    """What the last lean step of an optimizer saw, without keeping a tensor alive: a weak reference
    to each ``param.grad`` (flat parameter order), whether the local tensors are those grads or
    their DTensor shards (``local``), which of them count toward the norm (``counted``: all, none,
    or one flag each), the local tensors' data pointers, and their one (device, dtype) group with
    its backend and span plan. ``died`` becomes ``[True]`` when one of those grads is freed (a
    dead reference reads None, which must not match a grad now None)."""

    refs: list[Callable[[], torch.Tensor | None]]
    died: list[bool]
    local: bool
    counted: bool | tuple[bool, ...]
    data_ptrs: tuple[int, ...]
    has_none: bool
    key: GroupKey
    backend: kernels.Backend
    span_plan: spans.SpanPlan | None

    @staticmethod
    def watch(raw: list[torch.Tensor | None]) -> tuple[list[Callable[[], torch.Tensor | None]], list[bool]]:
        """Weak references to ``raw`` that set the returned flag when one of them dies."""
        died = [False]

        def on_death(_: object) -> None:
            died[0] = True

        return [_no_grad if g is None else weakref.ref(g, on_death) for g in raw], died

    def holds(self, raw: list[torch.Tensor | None]) -> _Lists | None:
        """(local tensors, sources, norm tensors) as GradSet keeps them, if ``raw`` (every
        ``param.grad``) are the same live objects as then and their local tensors sit at the same
        addresses; else None. A DTensor's shard is read again (``_local_tensor``), not assumed.
        Same object and address leave the sizes and strides as they were unless changed in place
        (``resize_``, ``as_strided_``, ``set_`` onto the same memory), which no framework does to a
        gradient."""
        if self.died[0] or len(raw) != len(self.refs):
            return None
        if not all(map(operator.is_, raw, [ref() for ref in self.refs])):
            return None
        # Same objects as then: no None where there was a grad.
        sources: list[torch.Tensor] = [g for g in raw if g is not None] if self.has_none else raw  # type: ignore[assignment]
        tensors = list(map(_LOCAL_OF, sources)) if self.local else sources
        if tuple(map(_DATA_PTR_OF, tensors)) != self.data_ptrs:
            return None
        counted = self.counted
        if counted is True:
            norms: list[torch.Tensor | None] = tensors  # type: ignore[assignment]
        elif counted is False:
            norms = [None] * len(tensors)
        else:
            norms = [t if c else None for t, c in zip(tensors, counted, strict=True)]
        return tensors, sources, norms


class _Entry:
    """One optimizer's cached classification, and what its last lean step saw."""

    __slots__ = ("classification", "first_grad", "key", "last_grads", "params")

    def __init__(self, params: list[list[torch.Tensor]], key: tuple[Any, ...], found: Classification) -> None:
        self.params = params  # per param group, a copy of its list
        self.key = key
        self.classification = found
        self.last_grads: _LastGrads | None = None
        # The first grad of the last full build, weakly: a memo is built only when it is seen again
        # (fresh grads every step would pay for weak references they never use).
        self.first_grad: Callable[[], torch.Tensor | None] = _no_grad


class ClassificationCache:
    """Per optimizer, the classification of its parameters (see :func:`~distscale.sharding.classify`),
    reused while its parameter lists hold the same objects and the layout has not changed:
    classifying costs attribute lookups per parameter that would otherwise repeat every step.

    Gradients themselves are only weakly referenced across steps: holding the last step's tensors
    would keep them alive after ``zero_grad(set_to_none=True)``, a whole extra set of gradients.
    """

    def __init__(self, layout: Layout | None = None, group: GroupRanks | None = None) -> None:
        self.layout = Layout() if layout is None else layout
        self.group: GroupRanks = _SingleProcess() if group is None else group
        self._entries: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Entry]
        self._entries = weakref.WeakKeyDictionary()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (ClassificationCache, ())  # a cache: pickles empty (weak references do not pickle)

    def entry(self, optimizer: torch.optim.Optimizer) -> _Entry:
        """The optimizer's entry, classified anew when its parameter lists or declarations changed."""
        key = (self.layout.version, *(g.get(REPLICATE_DIMS_KEY) for g in optimizer.param_groups))
        params = [g["params"] for g in optimizer.param_groups]
        entry = self._entries.get(optimizer)
        if (
            entry is not None
            and entry.key == key
            and len(entry.params) == len(params)
            and all(
                len(old) == len(new) and all(map(operator.is_, old, new))
                for old, new in zip(entry.params, params, strict=True)
            )
        ):
            return entry
        group = frozenset(self.group.global_ranks)
        found = classify(optimizer.param_groups, self.layout, group, self.group.global_rank)
        entry = _Entry([list(ps) for ps in params], key, found)
        self._entries[optimizer] = entry
        return entry

    def classification(self, optimizer: torch.optim.Optimizer) -> Classification:
        return self.entry(optimizer).classification


class GradSet:
    """One optimizer's local gradients, as seen at one moment, checked with ``kernel``
    (a :data:`~distscale.kernels.KERNEL_CHOICES` choice, resolved once per group).

    Three aligned lists: ``tensors`` (local storage, checked and unscaled), ``sources``
    (``param.grad`` itself) and ``norm_tensors`` (the elements this rank counts toward the norm, or
    None). In the common case (every parameter a plain tensor of one counting kind, every grad a
    plain strided tensor) they are built with a few C-level passes and no per-gradient record.

    ``track_changes``: remember version counters after each write, so ``unchanged_since`` can tell
    later whether someone else wrote the grads. Grads the step unscales are never checked again,
    so only read-only checks (fused optimizers) need it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cache: ClassificationCache | None = None,
        kernel: str = "auto",
        *,
        track_changes: bool = True,
    ) -> None:
        entry = (ClassificationCache() if cache is None else cache).entry(optimizer)
        found = self.classification = entry.classification
        self.param_groups = optimizer.param_groups  # to name unresolved parameters
        self.kernel = kernel
        self.tracking = track_changes
        self._groups: dict[GroupKey, _Group] | None = None
        raw = list(map(_GRAD_OF, chain.from_iterable(entry.params)))
        last = entry.last_grads
        held = None if last is None else last.holds(raw)
        self.lean = held is not None  # whether last step's layout held
        self.norm_tensors: list[torch.Tensor | None]
        if last is not None and held is not None:
            self.tensors, self.sources, self.norm_tensors = held
            ts = self.tensors
            self._groups = {last.key: _Group(range(len(ts)), ts, last.backend, last.span_plan)}
        else:
            present = [g for g in raw if g is not None]
            if found.uniform is not None and _all_plain(present):
                self.tensors = self.sources = present
                self.norm_tensors = present if found.uniform == COUNTED else [None] * len(present)
            else:
                params = [p for ps in entry.params for p in ps]
                self.tensors, self.sources, self.norm_tensors = local_grads(params, found.kinds)
            self._remember(entry, raw)
        self._versions: list[int] | None = self._snapshot() if track_changes else None
        # (norm_type, local norm of the current values) from a fused check; None when stale.
        self._fused_norm: tuple[float, torch.Tensor] | None = None

    @property
    def grads(self) -> list[LocalGrad]:
        """One :class:`~distscale.sharding.LocalGrad` per gradient (built on demand: diagnostics)."""
        return list(map(LocalGrad, self.tensors, self.sources, self.norm_tensors))

    def counted(self) -> list[torch.Tensor]:
        """The elements this rank counts toward the norm, one tensor per counted gradient."""
        return [n for n in self.norm_tensors if n is not None]

    def unresolved_flag(self, device: torch.device) -> torch.Tensor:
        """1.0 if this rank holds parameters whose counting rule is unknown, else 0.0 (0-dim)."""
        return torch.full((), float(bool(self.classification.unresolved)), device=device)

    def _snapshot(self) -> list[int]:
        # A local view shares its base's version counter, so the stored tensors see later writes.
        return list(map(_VERSION_OF, self.tensors))

    def refresh_versions(self) -> None:
        """Record our own in-place writes, so they do not count as a change."""
        self._versions = self._snapshot()

    def _wrote(self) -> None:
        if self.tracking:
            self.refresh_versions()

    def _remember(self, entry: _Entry, raw: list[torch.Tensor | None]) -> None:
        """Keep what the lean path needs next step, when the grads look persistent (the first one
        is the object seen first last time) and fit it: one (device, dtype) group, local tensors
        that are the grads themselves or all their DTensor shards, counted whole or not at all."""
        entry.last_grads = None
        tensors, sources, norms = self.tensors, self.sources, self.norm_tensors
        first = sources[0] if sources else None
        persistent = first is not None and entry.first_grad() is first
        entry.first_grad = _no_grad if first is None else weakref.ref(first)
        if not persistent or len(self.groups()) != 1:
            return
        if tensors is sources or all(map(operator.is_, tensors, sources)):
            local = False
        elif _all_plain(tensors) and all(map(operator.is_, tensors, map(_local_or_none, sources))):
            local = True
        else:
            return  # special grads (sparse, FSDP1 flat parameters, views of them): rebuilt each step
        counted: bool | tuple[bool, ...]
        if norms is tensors or all(map(operator.is_, norms, tensors)):
            counted = True
        elif all(n is None for n in norms):
            counted = False
        elif all(n is None or n is t for n, t in zip(norms, tensors, strict=True)):
            counted = tuple(n is not None for n in norms)
        else:
            return  # a counted part of a tensor
        ((key, group),) = self.groups().items()
        entry.last_grads = _LastGrads(
            *_LastGrads.watch(raw),
            local,
            counted,
            tuple(map(_DATA_PTR_OF, tensors)),
            len(sources) != len(raw),
            key,
            group.backend,
            group.span_plan,
        )

    def groups(self) -> dict[GroupKey, _Group]:
        """The grads by (device, dtype) with their backends and span plans, computed once: a
        GradSet's tensors never change. One group (the common case) costs two C-level passes."""
        if self._groups is None:
            ts = self.tensors
            devices, dtypes = set(map(_DEVICE_OF, ts)), set(map(_DTYPE_OF, ts))
            if len(devices) == 1 and len(dtypes) == 1:
                key = (next(iter(devices)), next(iter(dtypes)))
                backend = kernels.backend(self.kernel, *key)
                self._groups = {key: _Group(range(len(ts)), ts, backend, self._span_plan(ts, backend))}
            else:
                by_key: dict[GroupKey, list[int]] = defaultdict(list)
                for i, t in enumerate(ts):
                    by_key[(t.device, t.dtype)].append(i)
                self._groups = {}
                for key, indices in by_key.items():
                    tensors = [ts[i] for i in indices]
                    backend = kernels.backend(self.kernel, *key)
                    self._groups[key] = _Group(indices, tensors, backend, self._span_plan(tensors, backend))
        return self._groups

    @staticmethod
    def _span_plan(tensors: list[torch.Tensor], backend: kernels.Backend) -> spans.SpanPlan | None:
        # The Triton table merges spans itself, from raw addresses.
        return None if backend == "triton" else spans.plan(tensors)

    def _same_objects(self, optimizer: torch.optim.Optimizer) -> bool:
        params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
        current = [g for g in map(_GRAD_OF, params) if g is not None]  # each grad read once
        return len(current) == len(self.sources) and all(map(operator.is_, current, self.sources))

    def unchanged_since(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s grads are still exactly the tensors and versions checked (False
        when versions were not tracked). Reads only ``param.grad`` identities and version
        counters: no sharding work, no sync.
        """
        return (
            self._versions is not None
            and self._same_objects(optimizer)
            and self._snapshot() == self._versions
        )

    def check_(
        self,
        found_inf: torch.Tensor,
        inv_scale: torch.Tensor | None,
        norm_type: float | None = None,
        amax_out: torch.Tensor | None = None,
    ) -> None:
        """Accumulate this rank's inf/NaN flag into ``found_inf`` and unscale if ``inv_scale``;
        raise ``amax_out`` to the largest |gradient| as read (see :func:`distscale.kernels.check_`).

        ``norm_type``: the norm ``local_norm`` will be asked for; taken in the same pass when every
        group runs on the "triton" backend and it is 2 or inf (ignored otherwise).
        Runs one kernel call per (device, dtype) group; no host sync.
        """
        self._fused_norm = None
        groups = self.groups()
        fuse = norm_type in kernels.FUSED_NORM_TYPES and all(g.backend == "triton" for g in groups.values())
        nts = self.norm_tensors
        counts = (
            {
                key: [_counted_numel(g.tensors[j], nts[i]) for j, i in enumerate(g.indices)]
                for key, g in groups.items()
            }
            if fuse
            else {}
        )
        fuse = fuse and all(None not in c for c in counts.values())
        group_norms: list[torch.Tensor] = []
        with torch.no_grad():
            found = _PerDevice(found_inf)
            inv = None if inv_scale is None else _PerDevice(inv_scale)
            amax = None if amax_out is None else _PerDevice(amax_out)
            for (device, dtype), group in groups.items():
                norm = kernels.check_(
                    group.tensors,
                    found.get(device),
                    None if inv is None else inv.get(device),
                    norm_type if fuse else None,
                    backend=group.backend,
                    norm_numels=counts[(device, dtype)] if fuse else None,  # type: ignore[arg-type]
                    amax_out=None if amax is None else amax.get(device),
                    coalesced=None if group.backend == "triton" else group.coalesced(),
                )
                if norm is not None:
                    group_norms.append(norm.to(found_inf.device))
            found.max_into_master()
            if amax is not None:
                amax.max_into_master()
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
        # A fused norm stays valid only while the values are those it read.
        if self.tracking or fuse:
            self.refresh_versions()

    def unscale_(self, inv_scale: torch.Tensor) -> None:
        """Multiply every local grad by ``inv_scale`` in place (grads already checked and
        unchanged since): the check's kernel, its flag discarded. No host sync."""
        self._fused_norm = None
        with torch.no_grad():
            inv = _PerDevice(inv_scale)
            for (device, _), group in self.groups().items():
                scratch = torch.zeros((), dtype=torch.float32, device=device)
                kernels.check_(
                    group.tensors,
                    scratch,
                    inv.get(device),
                    backend=group.backend,
                    coalesced=None if group.backend == "triton" else group.coalesced(),
                )
        self._wrote()

    def local_norm(
        self, norm_type: float, device: torch.device, scale_by: torch.Tensor | None
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
        if self.norm_tensors is self.tensors and all(map(_NUMEL_OF, self.tensors)):
            # Every grad counted whole, none empty: the (device, dtype) groups are already known.
            by_group = [g.tensors for g in self.groups().values()]
        else:
            # Empty shards contribute nothing (and torch's inf-norm refuses them).
            counted = [n for n in self.norm_tensors if n is not None and n.numel()]
            by_group = list(group_by_device_and_dtype(counted).values())
        with torch.no_grad():
            # torch's multi-tensor norm, unless the reference backend was chosen (see kernels.norms).
            backend: kernels.Backend = "reference" if self.kernel == "reference" else "torch"
            # One vector of per-tensor norms in group order (moved per group, not per tensor).
            stacked = [torch.stack(kernels.norms(ts, norm_type, backend)).to(device) for ts in by_group if ts]
            if not stacked:
                return torch.zeros((), dtype=torch.float32, device=device)
            per_tensor = stacked[0] if len(stacked) == 1 else torch.cat(stacked)
            total = torch.linalg.vector_norm(per_tensor, norm_type)
            if scale_by is not None:
                total = total * scale_by.to(device)
        return total.float()

    def mul_(self, factor: torch.Tensor) -> None:
        """Multiply every local grad by ``factor`` in place (the clip), grouped by (device, dtype)
        like ``torch.nn.utils.clip_grad_norm_`` so results match it bitwise. No host sync."""
        self._fused_norm = None
        with torch.no_grad():
            for (device, _), group in self.groups().items():
                # Elementwise: once per contiguous span, bitwise the per-tensor product.
                torch._foreach_mul_(group.coalesced(), factor.to(device))
        self._wrote()
