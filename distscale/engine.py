"""The step engine: every per-optimizer transition of a step, from the local check to its outcome.

A step is the calls between two ``update()``. Per optimizer the engine keeps one record and moves
it through: local check (and unscale) of its gradients, with no communication; at the first call
that needs a job-wide answer (``step``, ``clip_grad_norm_``, ``update``), **one** collective
carrying every checked optimizer's flag, its clip norm and the step's other counts; then the clip
(in place, or folded into a fused optimizer's ``grad_scale``) and the optimizer step or skip; and
at ``update()``, the step's :class:`~distscale.stats.StepOutcome` for the rule and the metrics.

The optimizers and clip norm types a step used become the *plan* of the next one: at its first
collective, planned optimizers not checked yet are checked read-only so their flags travel in the
same collective. If their gradients change afterwards (another backward, ``zero_grad``), version
counters tell, and they are checked and reduced again (a second collective, never a wrong
decision). :class:`~distscale.GradScaler` holds the stage checks of torch's API and calls one
method here per public call; nothing else changes a record.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

# torch's own enum: code that compares a stage with torch.amp.grad_scaler.OptState keeps working.
from torch.amp.grad_scaler import OptState

from distscale import consistency, diagnostics, rules, underflow
from distscale.collectives import Contribution, ReduceGroup
from distscale.config import ScalerConfig
from distscale.errors import ReplicationError
from distscale.layout import Layout, refusal
from distscale.overflow import ClassificationCache, GradSet
from distscale.policy import ScaleState
from distscale.stats import StepOutcome

__all__ = ["OptRecord", "OptState", "ReducedFlags", "StepEngine", "inv_scale", "takes_grad_scale"]


def inv_scale(state: ScaleState) -> torch.Tensor:
    # float64 reciprocal, as torch: float32 division is imprecise under some compile options.
    return state.scale.double().reciprocal().float()


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` unscales and skips by itself from ``grad_scale``/``found_inf``
    attributes (torch's fused Adam/AdamW/SGD/Adagrad): then the engine never syncs for it."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _combined_norm(norms: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
    # The norm over several optimizers' norms of one type (exact: the p-norm of p-norms).
    if not norms:
        return None
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms).float(), norm_type)


@dataclass(eq=False)
class ReducedFlags:
    """The flags one collective brought back; read on the host at most once (the one sync)."""

    flags: torch.Tensor
    host: list[float] | None = None

    def read(self) -> list[float]:
        if self.host is None:
            self.host = self.flags.tolist()  # host sync (documented in GradScaler.step)
        return self.host


@dataclass(eq=False)
class OptRecord:
    """One optimizer in the current step. Changed by :class:`StepEngine` only."""

    optimizer: weakref.ref[torch.optim.Optimizer]
    stage: OptState = OptState.READY
    grads: GradSet | None = None
    local_found_inf: torch.Tensor | None = None  # this rank's flag
    unscaled: bool = False  # grads hold unscaled values
    norm_type: float | None = None  # norm computed for this optimizer (clip, or planned clip)
    local_norm: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None  # job-wide flag, same on every rank
    total_norm: torch.Tensor | None = None  # job-wide norm of the unscaled grads
    reduced_flags: ReducedFlags | None = None
    flag_index: int = 0  # this record's entry in ``reduced_flags``
    clipped: bool = False  # clip_grad_norm_ was called
    clip_coef: torch.Tensor | None = None  # folded into grad_scale at a fused step
    underflow: torch.Tensor | None = None  # local (zeros, would_flush, total) on monitor steps
    underflow_reduced: torch.Tensor | None = None  # the same, summed over the group
    local_amax: torch.Tensor | None = None  # largest |scaled grad| here (the "amax" rule only)
    amax: torch.Tensor | None = None  # the same, the maximum over the group
    skip: torch.Tensor | None = None  # job-wide: found_inf, or a skip rule (see distscale.rules)

    @property
    def checked(self) -> bool:
        return self.local_found_inf is not None

    @property
    def reduced(self) -> bool:
        return (
            self.found_inf is not None
            and (self.norm_type is None or self.total_norm is not None)
            and (self.local_amax is None or self.amax is not None)
        )

    def invalidate(self) -> None:
        """The grads changed: everything derived from them must be computed again."""
        self.local_found_inf = self.found_inf = None
        self.local_norm = self.total_norm = None
        self.underflow = self.underflow_reduced = None
        self.local_amax = self.amax = None
        self.reduced_flags = None
        self.skip = None


@dataclass
class _Step:
    """What happened since the last ``update()``."""

    records: dict[int, OptRecord] = field(default_factory=dict)
    num_collectives: int = 0
    # The losses given to scale() (skip rules): their sum (non-finite ones left out), how many,
    # and whether one was not finite. Local, on the loss's device.
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    loss_bad: torch.Tensor | None = None
    decision: rules.Decision | None = None  # taken at the step's first collective
    decision_flags: ReducedFlags | None = None  # holds Decision.host_vector from decision_at
    decision_at: int = 0
    fault_report: diagnostics.FaultReport | None = None


class StepEngine:
    """The step machinery of one GradScaler (see the module docstring).

    Every method that may issue the step's collective must be called on every rank of
    ``reducer``'s group at the same point of the step (SPMD training does).
    """

    def __init__(
        self,
        reducer: ReduceGroup,
        kernel: str,
        *,
        layout: Layout | None = None,
        check_every: int = 0,
        underflow_every: int = 0,
        overflow_diagnostics: bool = False,
        measure_amax: bool = False,
    ) -> None:
        self.reducer = reducer
        self.measure_amax = measure_amax  # the largest |scaled grad| per step, for the "amax" rule
        self.kernel = kernel
        self.check_every = check_every
        self.underflow_every = underflow_every
        self.overflow_diagnostics = overflow_diagnostics
        self.parameter_names: dict[int, str] | None = None  # id(param) -> name, for reports and errors
        self.last_overflow_report: diagnostics.OverflowReport | None = None
        # Per optimizer: how to read each parameter's grad, and which rank counts it.
        self.classifications = ClassificationCache(layout, reducer)
        self.num_updates_host = 0  # host mirror of num_updates: consistency and monitor schedules
        # The skip rules (distscale.rules): their settings (None: off) and state, set by the façade.
        self.rule_config: ScalerConfig | None = None
        self.rule_state: rules.RuleState | None = None
        self.last_fault_report: diagnostics.FaultReport | None = None
        self.step_fault_report: diagnostics.FaultReport | None = None
        self._step = _Step()
        self._plan: list[tuple[weakref.ref[torch.optim.Optimizer], float | None]] = []

    def fresh(self, reducer: ReduceGroup) -> StepEngine:
        """A new engine with these settings and no step in progress (for pickling). Its layout
        is empty: a process group and a mesh belong to the process that made them."""
        engine = StepEngine(
            reducer,
            self.kernel,
            check_every=self.check_every,
            underflow_every=self.underflow_every,
            overflow_diagnostics=self.overflow_diagnostics,
            measure_amax=self.measure_amax,
        )
        engine.parameter_names = self.parameter_names
        engine.rule_config = self.rule_config
        return engine

    # ------------------------------------------------------------------ what the façade reads

    def record(self, optimizer: torch.optim.Optimizer) -> OptRecord:
        """``optimizer``'s record in the current step (created READY)."""
        rec = self._step.records.get(id(optimizer))
        if rec is None or rec.optimizer() is not optimizer:
            rec = self._step.records[id(optimizer)] = OptRecord(weakref.ref(optimizer))
        return rec

    def step_records(self) -> dict[int, OptRecord]:
        """The current step's records, by ``id(optimizer)`` (a copy of the mapping)."""
        return dict(self._step.records)

    @property
    def in_progress(self) -> bool:
        """Whether a step has started (some scaler call since the last ``update()``)."""
        return bool(self._step.records)

    @property
    def checked_any(self) -> bool:
        return any(rec.checked for rec in self._step.records.values())

    # ------------------------------------------------------------------ transitions

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember a loss given to ``scale()`` for the loss rules and fault attribution (its
        mean over the step's calls, then over the ranks, is the step's loss). Local, no sync."""
        value = loss.detach().reshape(()).float()
        finite = torch.isfinite(value)
        value = torch.where(finite, value, 0.0)
        step = self._step
        step.loss_sum = value if step.loss_sum is None else step.loss_sum + value.to(step.loss_sum.device)
        bad = ~finite
        step.loss_bad = bad if step.loss_bad is None else step.loss_bad | bad.to(step.loss_bad.device)
        step.loss_count += 1

    def unscale_(self, optimizer: torch.optim.Optimizer, state: ScaleState) -> None:
        """Check and unscale ``optimizer``'s local grads in place. Local only."""
        rec = self.record(optimizer)
        self._check(rec, optimizer, state, unscale=True)
        rec.stage = OptState.UNSCALED

    def clip_grad_norm_(
        self, optimizer: torch.optim.Optimizer, state: ScaleState, max_norm: float, norm_type: float
    ) -> torch.Tensor:
        """Reduce the job-wide norm of ``optimizer``'s unscaled grads in the step's collective and
        clip: in place, or (fused optimizer, grads still scaled) folded into ``grad_scale``."""
        rec = self.record(optimizer)
        unscale = rec.unscaled or not takes_grad_scale(optimizer)
        self._check(rec, optimizer, state, unscale=unscale, norm_type=norm_type)
        if rec.norm_type != norm_type:
            rec.norm_type, rec.local_norm, rec.total_norm = norm_type, None, None
        self._reduce(state)
        assert rec.total_norm is not None
        coef = torch.clamp(max_norm / (rec.total_norm + 1e-6), max=1.0)
        rec.clipped = True
        if rec.unscaled:
            rec.stage = OptState.UNSCALED
            assert rec.grads is not None
            rec.grads.mul_(coef)
        else:
            rec.clip_coef = coef
        return rec.total_norm

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        state: ScaleState,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Apply ``optimizer.step(*args, **kwargs)`` unless any rank found inf/NaN in its grads.

        Fused optimizers get the job-wide ``found_inf`` and ``grad_scale`` (the scale folded with
        any clip coefficient) as device tensors: no host sync. Others: one read of the step's flags.
        """
        rec = self.record(optimizer)
        if takes_grad_scale(optimizer):
            self._check(rec, optimizer, state, unscale=rec.unscaled)
            self._reduce(state)
            user_scale = getattr(optimizer, "grad_scale", None)
            if rec.unscaled:
                grad_scale = user_scale
            else:
                grad_scale = state.scale if rec.clip_coef is None else state.scale / rec.clip_coef
                if user_scale is not None:
                    grad_scale = grad_scale * user_scale
            optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
            optimizer.found_inf = rec.skip  # type: ignore[attr-defined]
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
            rec.stage = OptState.STEPPED
            return retval
        self._check(rec, optimizer, state, unscale=True)
        self._fold_pending_clip(rec)
        self._reduce(state)
        retval = None
        if not self._skip_on_host(rec):
            retval = optimizer.step(*args, **kwargs)
        rec.stage = OptState.STEPPED
        return retval

    def check_inf(self, optimizer: torch.optim.Optimizer, state: ScaleState) -> torch.Tensor:
        """``optimizer``'s job-wide inf/NaN flag for this step: its grads checked as they are
        (scaled, unless the user unscaled them), then the step's collective. For optimizers that
        unscale for themselves (torch's legacy ``grad_scaler=`` protocol)."""
        rec = self.record(optimizer)
        self._check(rec, optimizer, state, unscale=rec.unscaled)
        self._reduce(state)
        assert rec.skip is not None
        return rec.skip

    def legacy_step(
        self, optimizer: torch.optim.Optimizer, scaler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``optimizer.step(*args, grad_scaler=scaler, **kwargs)``: the optimizer takes the
        decision itself, through ``scaler._check_inf_per_device`` (see :meth:`check_inf`)."""
        retval = optimizer.step(*args, **{**kwargs, "grad_scaler": scaler})
        self.record(optimizer).stage = OptState.STEPPED
        return retval

    def found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """torch's ``found_inf_per_device`` of ``optimizer`` in this step: the job-wide flag once
        reduced, this rank's before, nothing before a check."""
        rec = self._step.records.get(id(optimizer))
        if rec is None or rec.optimizer() is not optimizer:
            return {}
        flag = rec.skip if rec.skip is not None else rec.local_found_inf
        return {} if flag is None else {flag.device: flag}

    def finish(self, state: ScaleState) -> StepOutcome:
        """Reduce what is pending and end the step: its outcome, the same on every rank."""
        self._reduce(state)
        records = [r for r in self._step.records.values() if r.checked]
        flags = torch.stack([rec.found_inf for rec in records])  # type: ignore[misc]
        norms = [(rec.total_norm, rec.norm_type) for rec in records if rec.clipped]
        # Several clipped optimizers: the norm over all of them (same norm_type).
        grad_norm = _combined_norm([n for n, _ in norms], norms[0][1]) if norms else None  # type: ignore[misc,arg-type]
        counts = [rec.underflow_reduced for rec in records if rec.underflow_reduced is not None]
        under = underflow.fractions(torch.stack(counts).sum(0)) if counts else None
        maxima = [rec.amax for rec in records if rec.amax is not None]
        amax = torch.stack(maxima).amax() if maxima else None
        skipped = None  # known on the host only if step() already read every record's flags
        if all(rec.reduced_flags is not None and rec.reduced_flags.host is not None for rec in records):
            skipped = any(self._skip_on_host(rec) for rec in records)
        found_inf, overflows = flags.sum(), (flags > 0).sum()
        decision, held = self._step.decision, None
        if decision is not None:
            # A step a rule or a suspected fault skipped is held, not backed off: no overflow for
            # the rule, even where its gradients were non-finite.
            found_inf = torch.where(decision.skip, 0.0, found_inf)
            overflows = torch.where(decision.skip, 0, overflows)
            held = decision.skip
        report = self._step.fault_report
        self.end()
        self.step_fault_report = report  # the façade warns or raises on it after the update
        if report is not None:
            self.last_fault_report = report
        return StepOutcome(found_inf, overflows, grad_norm, under, skipped, amax, held, decision)

    def _skip_on_host(self, rec: OptRecord) -> bool:
        """Whether ``rec``'s optimizer skips this step, read on the host (the step's one read)."""
        assert rec.reduced_flags is not None
        if rec.reduced_flags.read()[rec.flag_index]:
            return True
        step = self._step
        if step.decision_flags is None:
            return False
        return bool(step.decision_flags.read()[step.decision_at])

    def end(self) -> None:
        """End the step without an outcome (``update(new_scale)``): remember what it used."""
        self._plan = [
            (rec.optimizer, rec.norm_type if rec.clipped else None)
            for rec in self._step.records.values()
            if rec.checked
        ]
        self._step = _Step()

    def clip_unscaled(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float
    ) -> torch.Tensor:
        """A disabled scaler's clip (bf16/fp32 training): the shard-aware norm in one collective,
        then the clip in place. Outside any step."""
        grads = GradSet(optimizer, self.classifications, self.kernel, track_changes=False)
        tensors = grads.tensors
        device = tensors[0].device if tensors else torch.device("cpu")  # a rank may hold no grads
        local = grads.local_norm(norm_type, device, None)
        distributed = self.reducer.world_size > 1
        reduced = self.reducer.reduce(
            Contribution(
                flags=[grads.unresolved_flag(device)] if distributed else [], norms=[(local, norm_type)]
            )
        )
        self._verify_layout([grads], ReducedFlags(torch.stack(reduced.flags)) if distributed else None)
        total = reduced.norms[0]
        grads.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    # ------------------------------------------------------------------ the machinery

    def _monitor_step(self) -> bool:
        return self.underflow_every > 0 and self.num_updates_host % self.underflow_every == 0

    def _check(
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
                rec.grads.unscale_(inv_scale(state))
                rec.unscaled = True
                self._fold_pending_clip(rec)
            return
        rec.invalidate()
        # Unscaled grads are never checked again, so only a read-only check tracks versions.
        rec.grads = GradSet(optimizer, self.classifications, self.kernel, track_changes=not unscale)
        rec.local_found_inf = torch.zeros((), dtype=torch.float32, device=state.scale.device)
        if self._monitor_step():
            # Before the check unscales: the monitor looks at the scaled values.
            rec.underflow = underflow.count(rec.grads.counted(), state.scale.device)
        if self.measure_amax:  # read in the check's pass (Triton), before it unscales
            rec.local_amax = torch.zeros((), dtype=torch.float32, device=state.scale.device)
        rec.grads.check_(
            rec.local_found_inf, inv_scale(state) if unscale else None, norm_type, rec.local_amax
        )
        rec.unscaled = unscale

    @staticmethod
    def _fold_pending_clip(rec: OptRecord) -> None:
        # A fused optimizer's clip coefficient was waiting to be folded into grad_scale, but the
        # grads were unscaled in place meanwhile: apply it in place instead.
        if rec.clip_coef is not None and rec.grads is not None:
            rec.grads.mul_(rec.clip_coef)
            rec.clip_coef = None

    def _reduce(self, state: ScaleState) -> None:
        """Reduce every checked-but-unreduced record with one collective (none if all are done).

        Every rank of the group calls it at the same point; the buffer layout depends only on
        the call sequence. Host sync only on consistency-check steps and the first norm after a
        parameter list changed (see ``_verify_layout``).
        """
        step = self._step
        world = self.reducer.world_size
        if step.num_collectives == 0 and world > 1:
            self._precheck_planned(state)
        pending = [r for r in step.records.values() if r.checked and not r.reduced]
        if not pending:
            return
        scale_by = inv_scale(state)
        rule_config = self.rule_config
        deciding = rule_config is not None and step.decision is None  # the step's first collective
        if deciding and rule_config.norm_rules:  # type: ignore[union-attr]
            for rec in pending:  # the rules watch the norm: every optimizer measures one
                if rec.norm_type is None:
                    rec.norm_type = 2.0
        normed = [r for r in pending if r.norm_type is not None]
        for rec in normed:
            if rec.local_norm is None:
                assert rec.grads is not None and rec.norm_type is not None
                rec.local_norm = rec.grads.local_norm(
                    rec.norm_type, state.scale.device, None if rec.unscaled else scale_by
                )
        counted = [r for r in pending if r.underflow is not None]
        # Records whose result depends on which rank counts what (norms, underflow fractions)
        # carry a flag "this rank holds parameters nobody can count": see ``_verify_layout``.
        owned = [r.grads for r in pending if r.norm_type is not None or r.underflow is not None]
        layout_flags = [g.unresolved_flag(state.scale.device) for g in owned] if world > 1 else []  # type: ignore[union-attr]
        check = (
            world > 1
            and self.check_every > 0
            and step.num_collectives == 0
            and self.num_updates_host % self.check_every == 0
        )
        local_flags = [r.local_found_inf for r in pending]
        maxed = [r for r in pending if r.local_amax is not None]
        # amax travels as an inf-norm: an exact maximum (NaN made inf first, see collectives).
        norms = [(r.local_norm, r.norm_type) for r in normed] + [(r.local_amax, math.inf) for r in maxed]
        sums = [r.underflow for r in counted]
        if deciding:  # the rules' inputs ride in the same collective
            local_any = torch.stack(local_flags).amax()  # type: ignore[arg-type]
            sums.append(
                rules.local_inputs(
                    local_any, self.reducer.rank, step.loss_sum, step.loss_count, step.loss_bad
                )
            )
        contribution = Contribution(
            flags=[*local_flags, *layout_flags],  # type: ignore[list-item]  # checked: not None
            norms=norms,  # type: ignore[arg-type]  # computed above: not None
            sums=sums,  # type: ignore[arg-type]
            slots=consistency.fingerprint(state) if check else None,
        )
        # float64 keeps the fingerprints exact (element counts travel as float32: fractions to 1e-7).
        reduced = self.reducer.reduce(contribution, torch.float64 if check else torch.float32)
        step.num_collectives += 1
        flag_values = torch.stack(reduced.flags)  # each record's flag, then the layout flags
        if deciding:
            assert rule_config is not None and self.rule_state is not None
            overflow = flag_values[: len(pending)].amax()
            step_norm = _combined_norm(reduced.norms[: len(normed)])
            decision = rules.decide(
                self.rule_state,
                rules.job_inputs(overflow, step_norm, reduced.sums[-1]),
                state.scale,
                rule_config,
            )
            step.decision, step.decision_at = decision, flag_values.numel()
            flag_values = torch.cat([flag_values, decision.host_vector().to(flag_values.device)])
        flags = ReducedFlags(flag_values)
        if deciding:
            step.decision_flags = flags
        self._verify_layout(owned, flags if world > 1 else None, len(pending))  # type: ignore[arg-type]
        for rec, counts in zip(counted, reduced.sums[: len(counted)], strict=True):  # then the rules' inputs
            rec.underflow_reduced = counts
        for rec, norm in zip(normed, reduced.norms[: len(normed)], strict=True):
            rec.total_norm = norm
        for rec, amax in zip(maxed, reduced.norms[len(normed) :], strict=True):
            rec.amax = amax
        rule_skip = None if step.decision is None else step.decision.skip
        for index, (rec, flag) in enumerate(zip(pending, reduced.flags, strict=False)):
            rec.found_inf, rec.reduced_flags, rec.flag_index = flag, flags, index
            rec.skip = flag if rule_skip is None else torch.maximum(flag, rule_skip.to(flag.device).float())
        for rec in normed:
            # Counted once, a copy that overflowed on another rank is not in the norm: a skipped
            # step's norm is inf on every rank (NaN stays NaN), as torch's is where it overflows.
            assert rec.found_inf is not None and rec.total_norm is not None
            overflowed = (rec.found_inf > 0) & torch.isfinite(rec.total_norm)
            rec.total_norm = torch.where(overflowed, math.inf, rec.total_norm)
        if reduced.slots is not None:
            consistency.verify(reduced.slots)
        if self.overflow_diagnostics:
            self._diagnose(pending, flags)
        if deciding and rule_config.on_fault is not None:  # type: ignore[union-attr]
            self._attribute_fault(pending, step)

    def _verify_layout(self, grad_sets: list[GradSet], flags: ReducedFlags | None, start: int = 0) -> None:
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
            unresolved = any(flags.read()[start : start + len(grad_sets)])  # host sync, first norm only
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

    def _diagnose(self, pending: list[OptRecord], flags: ReducedFlags) -> None:
        # The flags are job-wide, so every rank takes the same branch and joins the gather.
        values = flags.read()[: len(pending)]  # host sync (the one step() makes anyway if not fused)
        if not any(values):
            return
        found: list[diagnostics.NonFiniteGrad] = []
        for rec, flag in zip(pending, values, strict=True):
            optimizer = rec.optimizer()
            if flag and rec.grads is not None and optimizer is not None:
                names = diagnostics.parameter_names(optimizer, self.parameter_names)
                found.extend(diagnostics.scan(rec.grads.grads, names, self.reducer.rank))
        self.last_overflow_report = diagnostics.gather(found, self.reducer, self.num_updates_host)

    def _attribute_fault(self, pending: list[OptRecord], step: _Step) -> None:
        # The decision is job-wide, so every rank reads the same verdict and joins the gather.
        assert step.decision_flags is not None
        skip, reason, kind, fault_rank = step.decision_flags.read()[step.decision_at :]  # host sync
        del skip
        if int(reason) != rules.SKIP_REASONS.index("fault"):
            return
        found: list[diagnostics.NonFiniteGrad] = []
        for rec in pending:
            optimizer = rec.optimizer()
            if rec.grads is not None and optimizer is not None:
                names = diagnostics.parameter_names(optimizer, self.parameter_names)
                found.extend(diagnostics.scan(rec.grads.grads, names, self.reducer.rank))
        step.fault_report = diagnostics.gather_fault(
            rules.FAULT_KINDS[int(kind)],
            int(fault_rank),
            found,
            self.reducer,
            self.num_updates_host,
            device=pending[0].local_found_inf.device if pending[0].local_found_inf is not None else None,
        )

    def _precheck_planned(self, state: ScaleState) -> None:
        # Optimizers the last step used but this one has not touched yet: check them now
        # (read-only) so their flags join this step's collective.
        for ref, norm_type in self._plan:
            optimizer = ref()
            if optimizer is None or id(optimizer) in self._step.records:
                continue
            rec = self.record(optimizer)
            self._check(rec, optimizer, state, unscale=False, norm_type=norm_type)
            rec.norm_type = norm_type
