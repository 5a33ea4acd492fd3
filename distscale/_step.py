"""The façade's per-step machinery: local checks, the single collective, the plan for next step.

A step (the calls between two ``update()``) goes: local checks per optimizer (no communication),
then at the first call that needs a job-wide answer, one collective carrying every checked
optimizer's flag (and clip norm). The optimizers and clip norm types a step used become the
*plan* of the next one: at its first collective, planned optimizers not checked yet are checked
read-only so their flags travel in the same collective. If their gradients change afterwards
(another backward, ``zero_grad``), version counters tell, and they are checked and reduced again.
"""

from __future__ import annotations

import math
import weakref

import torch

from distscale import consistency, diagnostics, underflow
from distscale._iteration import Batch, Iteration, OptRecord
from distscale.collectives import Packed, ReduceGroup
from distscale.errors import ReplicationError
from distscale.layout import Layout, refusal
from distscale.overflow import GradCache, GradSet
from distscale.policy import ScaleState


def inv_scale(state: ScaleState) -> torch.Tensor:
    # float64 reciprocal, as torch: float32 division is imprecise under some compile options.
    return state.scale.double().reciprocal().float()


class StepSync:
    def __init__(
        self,
        reducer: ReduceGroup,
        kernel: str,
        check_every: int,
        *,
        layout: Layout | None = None,
        underflow_every: int = 0,
        overflow_diagnostics: bool = False,
    ) -> None:
        self.reducer = reducer
        self.kernel = kernel
        self.check_every = check_every
        self.underflow_every = underflow_every
        self.overflow_diagnostics = overflow_diagnostics
        self.parameter_names: dict[int, str] | None = None  # id(param) -> name, for diagnostics
        self.last_overflow_report: diagnostics.OverflowReport | None = None
        # Per optimizer: how to read each parameter's grad, and which rank counts it.
        self.cache = GradCache(layout, reducer)
        self.iteration = Iteration()
        self.plan: list[tuple[weakref.ref[torch.optim.Optimizer], float | None]] = []
        self.num_updates_host = 0  # host mirror of num_updates: consistency and monitor schedules

    def fresh(self, reducer: ReduceGroup) -> StepSync:
        """A new StepSync with these settings and no step in progress (for pickling). Its layout
        is empty: a process group and a mesh belong to the process that made them."""
        sync = StepSync(
            reducer,
            self.kernel,
            self.check_every,
            underflow_every=self.underflow_every,
            overflow_diagnostics=self.overflow_diagnostics,
        )
        sync.parameter_names = self.parameter_names
        return sync

    def monitor_step(self) -> bool:
        return self.underflow_every > 0 and self.num_updates_host % self.underflow_every == 0

    def check(
        self,
        rec: OptRecord,
        optimizer: torch.optim.Optimizer,
        state: ScaleState,
        unscale: bool,
        norm_type: float | None = None,
    ) -> None:
        """Make sure ``rec`` holds a local flag for the current grads, unscaled if asked. Local only.

        ``norm_type``: the clip norm about to be asked for, so a fused kernel can take it in the
        same pass (see ``GradSet.check_``)."""
        if rec.checked and rec.unscaled:
            # Unscaled grads are the user's to modify (clipping, say): never check them again.
            return
        if rec.checked and rec.grads is not None and rec.grads.unchanged_since(optimizer):
            if unscale:
                scratch = torch.zeros_like(state.scale)
                rec.grads.check_(scratch, inv_scale(state), self.kernel, check=False)
                rec.unscaled = True
                self.apply_pending_clip(rec)
            return
        rec.invalidate()
        rec.grads = GradSet(optimizer, self.cache)
        rec.local_found_inf = torch.zeros((), dtype=torch.float32, device=state.scale.device)
        if self.monitor_step():
            # Before the check unscales: the monitor looks at the scaled values.
            owned = [g.norm_tensor for g in rec.grads.grads if g.norm_tensor is not None]
            rec.underflow = underflow.count(owned, state.scale.device)
        rec.grads.check_(
            rec.local_found_inf, inv_scale(state) if unscale else None, self.kernel, norm_type=norm_type
        )
        rec.unscaled = unscale

    @staticmethod
    def apply_pending_clip(rec: OptRecord) -> None:
        # A fused optimizer's clip coefficient was waiting to be folded into grad_scale, but the
        # grads were unscaled in place meanwhile: apply it in place instead.
        if rec.clip_coef is not None and rec.grads is not None:
            rec.grads.mul_(rec.clip_coef)
            rec.clip_coef = None

    def reduce(self, state: ScaleState) -> None:
        """Reduce every checked-but-unreduced record with one collective (none if all are done).

        Every rank of the group calls it at the same point; the buffer layout depends only on
        the call sequence. Host sync only on consistency-check steps.
        """
        it = self.iteration
        world = self.reducer.world_size
        if it.num_collectives == 0 and world > 1:
            self._precheck_planned(state)
        pending = [r for r in it.records.values() if r.checked and not r.reduced]
        if not pending:
            return
        scale_by = inv_scale(state)
        sums: list[torch.Tensor] = []
        maxes: list[torch.Tensor] = []
        for rec in pending:
            if rec.norm_type is None:
                continue
            if rec.local_norm is None:
                assert rec.grads is not None
                rec.local_norm = rec.grads.local_norm(
                    rec.norm_type, state.scale.device, self.kernel, None if rec.unscaled else scale_by
                )
            if world > 1:  # on one process the local norm is the norm: no power round trip
                if math.isinf(rec.norm_type):
                    maxes.append(rec.local_norm)
                else:
                    sums.append(rec.local_norm**rec.norm_type)
        counted = [r for r in pending if r.underflow is not None]
        for rec in counted:  # three counts each, summed like the norm powers
            sums.extend(rec.underflow)  # type: ignore[arg-type]
        # Records whose result depends on which rank counts what (norms, underflow fractions)
        # carry a flag "this rank holds parameters nobody can count": see ``verify_layout``.
        owned = [r.grads for r in pending if r.norm_type is not None or r.underflow is not None]
        layout_flags = [g.unresolved_flag(state.scale.device) for g in owned] if world > 1 else []  # type: ignore[union-attr]
        check = (
            world > 1
            and self.check_every > 0
            and it.num_collectives == 0
            and self.num_updates_host % self.check_every == 0
        )
        packed = Packed(
            flags=[*(r.local_found_inf for r in pending), *layout_flags],  # type: ignore[misc]
            sums=sums,
            maxes=maxes,
            slots=consistency.fingerprint(state) if check else None,
        )
        # float64 keeps the fingerprints exact (element counts travel as float32: fractions to 1e-7).
        out = self.reducer.reduce(packed, torch.float64 if check else torch.float32)
        it.num_collectives += 1
        batch = Batch(torch.stack(out.flags))  # each record's flag, then the layout flags
        self.verify_layout(owned, batch if world > 1 else None, len(pending))  # type: ignore[arg-type]
        out.flags = out.flags[: len(pending)]
        n_counts = 3 * len(counted)
        if n_counts:
            counts = torch.stack(out.sums[len(out.sums) - n_counts :]).reshape(len(counted), 3)
            for rec, reduced in zip(counted, counts, strict=True):
                rec.underflow_reduced = reduced
            out.sums = out.sums[: len(out.sums) - n_counts]
        sums_iter, maxes_iter = iter(out.sums), iter(out.maxes)
        for index, (rec, flag) in enumerate(zip(pending, out.flags, strict=True)):
            rec.found_inf, rec.batch, rec.batch_index = flag, batch, index
            if rec.norm_type is None:
                continue
            if world == 1:
                rec.total_norm = rec.local_norm
            elif math.isinf(rec.norm_type):
                rec.total_norm = next(maxes_iter)
            else:
                rec.total_norm = next(sums_iter) ** (1.0 / rec.norm_type)
        if out.slots is not None:
            consistency.verify(out.slots)
        if self.overflow_diagnostics:
            self._diagnose(pending, batch)

    def verify_layout(self, grad_sets: list[GradSet], flags: Batch | None, start: int = 0) -> None:
        """Raise ReplicationError on every rank if any rank holds parameters whose counting rule
        is unknown (see :mod:`distscale.layout`). ``flags``: the job-wide flags of ``grad_sets``
        from index ``start`` of the step's reduced flags (None on one process).

        Reads the flags on the host only until a collective has shown them clear for the current
        parameter lists (the first norm after a parameter list changes): one ``tolist()``, the one
        ``step`` then reuses for optimizers that are not fused.
        """
        if all(g.classification.verified for g in grad_sets):
            return
        if flags is None:
            unresolved = any(g.classification.unresolved for g in grad_sets)
        else:
            unresolved = any(flags.read()[start:])  # host sync, first norm only
        if unresolved:  # job-wide: every rank takes this branch and joins the gather
            mine = [self._describe(g, *entry) for g in grad_sets for entry in g.classification.unresolved]
            found = self.reducer.all_gather_object(mine)
            raise ReplicationError(refusal(found, self.reducer.world_size))  # type: ignore[arg-type]
        for g in grad_sets:
            g.classification.verified = True

    def _describe(self, grads: GradSet, group: int, index: int, why: str) -> tuple[str, tuple[int, ...], str]:
        param = grads.param_groups[group]["params"][index]
        name = (self.parameter_names or {}).get(id(param)) or f"param_groups[{group}]['params'][{index}]"
        return name, tuple(param.shape), why

    def _diagnose(self, pending: list[OptRecord], batch: Batch) -> None:
        # The flags are job-wide, so every rank takes the same branch and joins the gather.
        flags = batch.read()[: len(pending)]  # host sync (the one step() makes anyway if not fused)
        if not any(flags):
            return
        found: list[diagnostics.NonFiniteGrad] = []
        for rec, flag in zip(pending, flags, strict=True):
            optimizer = rec.optimizer()
            if flag and rec.grads is not None and optimizer is not None:
                names = diagnostics.parameter_names(optimizer, self.parameter_names)
                found.extend(diagnostics.scan(rec.grads.grads, names, self.reducer.rank))
        self.last_overflow_report = diagnostics.gather(found, self.reducer, self.num_updates_host)

    def _precheck_planned(self, state: ScaleState) -> None:
        # Optimizers the last step used but this one has not touched yet: check them now
        # (read-only) so their flags join this step's collective.
        for ref, norm_type in self.plan:
            optimizer = ref()
            if optimizer is None or id(optimizer) in self.iteration.records:
                continue
            rec = self.iteration.record(optimizer)
            self.check(rec, optimizer, state, unscale=False, norm_type=norm_type)
            rec.norm_type = norm_type

    def finish(self) -> None:
        """End the step: remember what it used, start a fresh iteration."""
        self.plan = [
            (rec.optimizer, rec.norm_type if rec.clipped else None)
            for rec in self.iteration.records.values()
            if rec.checked
        ]
        self.iteration = Iteration()
