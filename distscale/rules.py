"""The step's skip decision beyond inf/NaN: spike rules and fault attribution, as pure functions.

The overflow flag says whether any rank's gradients were non-finite. Opt-in settings of
:class:`~distscale.ScalerConfig` extend that decision; everything it needs travels in the step's
single collective (:func:`local_inputs` is this rank's part), so :func:`decide` runs on job-wide
values and every rank takes the same decision, on the device (``torch.where`` only, no sync):

* **norm spikes**: the job-wide gradient norm above ``skip_grad_norm_above``, or more than
  ``skip_grad_norm_sigma`` standard deviations above the mean of the last ``spike_window`` applied
  steps' norms, or more than ``skip_grad_norm_ratio`` times that mean;
* **loss spikes**: the same for the job-wide loss (the mean of the losses the ranks gave to
  ``scale()``), and a non-finite loss (fp16 overflow in the forward pass: no backoff cures it);
* **suspected faults** (``on_fault``), non-finite events a backoff does not cure::

      lone_rank:      non-finite gradients on one rank only, on ``fault_repeats`` non-finite steps
                      in a row after a clean step, always the same rank (the backoffs between
                      did not help: fp16 overflow does not stay on one rank at ever lower scales)
      min_scale:      non-finite gradients with the scale at its floor (``min_scale``, else 1:
                      at or below 1 nothing is scaled up, so nothing overflows because of it)
      nonfinite_loss: a non-finite loss from finite gradients (the loss does not depend on the
                      scale: a corrupted batch, or a bad computation)

Reasons take precedence in this order: fault, loss spike, overflow, norm spike. A loss spike wins
over an overflow: the loss does not depend on the scale, so non-finite gradients that come with a
loss spike (a corrupted batch overflows easily) are the batch's doing, not the scale's, and a
backoff would only cost scale; a norm spike is judged on finite gradients only. A step skipped by a
rule or a suspected fault is **held**, not an overflow: the scale, the growth tracker, the
hysteresis and the "amax" window stay as they were (the gradients were finite, or a backoff would
not cure them); only ``num_updates`` advances. The statistics record applied steps only, so a spike
never raises the bar for the next one. With every rule off, :func:`decide` is never called and the
decision is the overflow flag alone, bitwise as before.
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch

from distscale import fields
from distscale.config import ScalerConfig
from distscale.fields import Field

__all__ = [
    "FAULT_KINDS",
    "SKIP_REASONS",
    "Decision",
    "RuleState",
    "StepInputs",
    "advance",
    "decide",
    "init_state",
    "job_inputs",
    "local_inputs",
]

SKIP_REASONS = ("none", "overflow", "norm_spike", "loss_spike", "fault")
"""``skip_reason`` codes: why the last step was skipped ("none": it was applied)."""
FAULT_KINDS = ("none", "lone_rank", "min_scale", "nonfinite_loss")
"""``fault_kind`` codes: which criterion named the last suspected fault (module docstring)."""
NOT_CLEAN_YET = -2  # lone_rank before any clean step: a streak starts only after one


def _window(config: ScalerConfig) -> int:
    return config.spike_window


class RuleState(NamedTuple):
    """The rules' statistics and counters: tensors on the scale's device, declared once (see
    :mod:`distscale.fields`); checkpointed under ``"rules"``."""

    norm_history: Annotated[torch.Tensor, Field(torch.float32, 0.0, since=5, length=_window)]
    """The last ``spike_window`` applied steps' gradient norms (a ring)."""
    loss_history: Annotated[torch.Tensor, Field(torch.float32, 0.0, since=5, length=_window)]
    """The same for the loss."""
    num_norms: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Norms recorded so far (the ring's write position, modulo its length)."""
    num_losses: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    lone_rank: Annotated[torch.Tensor, Field(torch.int64, NOT_CLEAN_YET, since=5)]
    """The only rank with non-finite gradients on the last step, if it was non-finite on exactly
    one; -1 otherwise, -2 before the first clean step."""
    lone_streak: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Non-finite steps in a row with ``lone_rank`` alone non-finite."""
    norm_spikes: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Steps skipped for a gradient-norm spike."""
    loss_spikes: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Steps skipped for a loss spike or a non-finite loss."""
    suspected_faults: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Steps skipped for a suspected fault."""
    skip_reason: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """Why the last step was skipped: an index into ``SKIP_REASONS``."""
    fault_kind: Annotated[torch.Tensor, Field(torch.int64, 0, since=5)]
    """The last step's fault criterion: an index into ``FAULT_KINDS``."""
    fault_rank: Annotated[torch.Tensor, Field(torch.int64, -1, since=5)]
    """The rank the last suspected fault named (-1: none yet, or not one rank)."""
    loss: Annotated[torch.Tensor, Field(torch.float32, math.nan, since=5)]
    """The last step's job-wide loss (NaN: no loss given to ``scale()``)."""

    def to(self, device: torch.device | str) -> RuleState:
        return RuleState(*(t.to(device) for t in self))


def init_state(config: ScalerConfig, device: torch.device | str = "cpu") -> RuleState:
    return fields.allocate(RuleState, config, device)


class StepInputs(NamedTuple):
    """What the decision reads: job-wide values, identical on every rank."""

    overflow: torch.Tensor
    """0-dim bool: some rank's gradients were non-finite."""
    grad_norm: torch.Tensor | None
    """The job-wide norm of the unscaled gradients (None: not measured)."""
    sums: torch.Tensor
    """``local_inputs`` summed over the ranks."""


class Decision(NamedTuple):
    """One step's decision beyond the overflow flag; 0-dim tensors, identical on every rank."""

    skip: torch.Tensor
    """bool: a rule or a suspected fault skips the step (held; the overflow flag skips anyway)."""
    reason: torch.Tensor
    """int64: an index into ``SKIP_REASONS``."""
    fault_kind: torch.Tensor
    fault_rank: torch.Tensor
    lone_rank: torch.Tensor
    """int64: the only rank with non-finite gradients, or -1."""
    grad_norm: torch.Tensor
    """float32, NaN when not measured."""
    loss: torch.Tensor
    """float32: the job-wide mean loss; inf when some rank's loss was not finite; NaN: none."""
    overflow: torch.Tensor
    """bool: some rank's gradients were non-finite (an overflow, or the fault's symptom)."""

    def host_vector(self) -> torch.Tensor:
        """(skip, reason, fault_kind, fault_rank) as float32, to read with the step's flags."""
        return torch.stack(
            [self.skip.float(), *(t.float() for t in (self.reason, self.fault_kind, self.fault_rank))]
        )


HOST_FIELDS = 4  # entries of Decision.host_vector


def local_inputs(
    local_overflow: torch.Tensor,
    rank: int,
    loss_sum: torch.Tensor | None,
    loss_count: int,
    loss_bad: torch.Tensor | None,
) -> torch.Tensor:
    """This rank's part of the step's collective (summed over the ranks), float32 on the flag's
    device: [non-finite gradients here, (rank + 1) if so, loss sum (finite part), losses given,
    non-finite loss here, (rank + 1) if so]. One rank alone non-finite is identified exactly by the
    sum of ``rank + 1``. No host sync."""
    device = local_overflow.device
    bad_grads = (local_overflow > 0).float()
    zero = torch.zeros((), device=device)
    loss = (
        zero
        if loss_sum is None
        else torch.nan_to_num(loss_sum.float().to(device), nan=0.0, posinf=0.0, neginf=0.0)
    )
    bad_loss = zero if loss_bad is None else loss_bad.float().to(device)
    count = torch.full((), float(loss_count), device=device)
    return torch.stack([bad_grads, bad_grads * (rank + 1), loss, count, bad_loss, bad_loss * (rank + 1)])


def job_inputs(overflow: torch.Tensor, grad_norm: torch.Tensor | None, summed: torch.Tensor) -> StepInputs:
    return StepInputs(overflow.reshape(()) > 0, grad_norm, summed.reshape(-1))


def _one_rank(count: torch.Tensor, rank_sum: torch.Tensor) -> torch.Tensor:
    # The rank that is alone in a set given by (count, sum of rank + 1); -1 if not exactly one.
    return torch.where(count == 1, rank_sum.round().long() - 1, -1)


def _spike(
    value: torch.Tensor,
    history: torch.Tensor,
    count: torch.Tensor,
    above: float | None,
    sigma: float | None,
    ratio: float | None,
    config: ScalerConfig,
) -> torch.Tensor:
    fires = value > above if above is not None else torch.zeros((), dtype=torch.bool, device=value.device)
    if sigma is not None or ratio is not None:
        n = torch.clamp(count, max=history.numel())
        valid = torch.arange(history.numel(), device=history.device) < n
        h = history.double()
        mean = torch.where(valid, h, 0.0).sum() / torch.clamp(n, min=1)
        ready = count >= max(config.spike_warmup, 2)
        v = value.double()
        if sigma is not None:
            var = torch.where(valid, (h - mean) ** 2, 0.0).sum() / torch.clamp(n - 1, min=1)
            fires = fires | (ready & (v > mean + sigma * var.sqrt()))
        if ratio is not None:
            fires = fires | (ready & (mean > 0) & (v > ratio * mean))
    return torch.isfinite(value) & fires


def decide(rs: RuleState, inputs: StepInputs, scale: torch.Tensor, config: ScalerConfig) -> Decision:
    """The step's decision from job-wide inputs (see the module docstring). Pure, no host sync."""
    device = scale.device
    overflow = inputs.overflow.to(device)
    s = inputs.sums.to(device)
    bad_ranks, bad_rank_sum, loss_sum, loss_count, bad_losses, bad_loss_sum = s.unbind()
    nan = torch.full((), math.nan, device=device)
    norm = nan if inputs.grad_norm is None else inputs.grad_norm.to(device=device, dtype=torch.float32)
    loss_bad = bad_losses > 0
    loss = torch.where(loss_count > 0, loss_sum / torch.clamp(loss_count, min=1), nan)
    loss = torch.where(loss_bad, math.inf, loss)
    clean = ~overflow
    norm_spike = clean & _spike(
        norm,
        rs.norm_history,
        rs.num_norms,
        config.skip_grad_norm_above,
        config.skip_grad_norm_sigma,
        config.skip_grad_norm_ratio,
        config,
    )
    # The loss does not depend on the scale: a spike judged on it holds even with an overflow.
    loss_spike = _spike(
        loss,
        rs.loss_history,
        rs.num_losses,
        config.skip_loss_above,
        config.skip_loss_sigma,
        config.skip_loss_ratio,
        config,
    )
    if config.loss_rules:
        loss_spike = loss_spike | loss_bad
    lone = _one_rank(bad_ranks, bad_rank_sum)
    kind = torch.zeros((), dtype=torch.int64, device=device)
    fault_rank = torch.full((), -1, dtype=torch.int64, device=device)
    if config.on_fault is not None:
        floor = 1.0 if config.min_scale is None else config.min_scale
        streak = torch.where((lone >= 0) & (lone == rs.lone_rank), rs.lone_streak + 1, 1)
        after_clean = rs.lone_rank != NOT_CLEAN_YET
        repeated = overflow & (lone >= 0) & after_clean & (streak >= config.fault_repeats)
        at_floor = overflow & (scale <= floor)
        bad_loss = clean & loss_bad
        kind = torch.where(repeated, 1, torch.where(at_floor, 2, torch.where(bad_loss, 3, kind)))
        fault_rank = torch.where(
            bad_loss, _one_rank(bad_losses, bad_loss_sum), torch.where(kind > 0, lone, -1)
        )
    fault = kind > 0
    reason = torch.where(
        fault, 4, torch.where(loss_spike, 3, torch.where(overflow, 1, torch.where(norm_spike, 2, 0)))
    )
    skip = fault | loss_spike | norm_spike
    return Decision(skip, reason, kind, fault_rank, lone, norm, loss.float(), overflow)


def _record(
    history: torch.Tensor, count: torch.Tensor, value: torch.Tensor, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    at = torch.arange(history.numel(), device=history.device) == count % history.numel()
    return torch.where(at & ok, value.float(), history), count + ok.long()


def advance(rs: RuleState, decision: Decision) -> RuleState:
    """The rules' state after the step: statistics of applied steps, the lone-rank streak, the
    counters. Pure, no host sync."""
    d = decision
    overflow = d.overflow
    applied = ~overflow & ~d.skip
    norm_history, num_norms = _record(
        rs.norm_history, rs.num_norms, d.grad_norm, applied & torch.isfinite(d.grad_norm)
    )
    loss_history, num_losses = _record(
        rs.loss_history, rs.num_losses, d.loss, applied & torch.isfinite(d.loss)
    )
    # The streak: non-finite steps in a row after a clean one, the same single rank each time.
    before_clean = rs.lone_rank == NOT_CLEAN_YET
    same = (d.lone_rank >= 0) & (d.lone_rank == rs.lone_rank)
    streak = torch.where(same, rs.lone_streak + 1, torch.where(d.lone_rank >= 0, 1, 0))
    lone_rank = torch.where(before_clean, NOT_CLEAN_YET, d.lone_rank)
    lone_rank = torch.where(overflow, lone_rank, -1)
    streak = torch.where(overflow & ~before_clean, streak, 0)
    return RuleState(
        norm_history=norm_history,
        loss_history=loss_history,
        num_norms=num_norms,
        num_losses=num_losses,
        lone_rank=lone_rank,
        lone_streak=streak,
        norm_spikes=rs.norm_spikes + (d.reason == 2).long(),
        loss_spikes=rs.loss_spikes + (d.reason == 3).long(),
        suspected_faults=rs.suspected_faults + (d.reason == 4).long(),
        skip_reason=d.reason.clone(),
        fault_kind=d.fault_kind.clone(),
        fault_rank=torch.where(d.reason == 4, d.fault_rank, rs.fault_rank),
        loss=d.loss.clone(),
    )
