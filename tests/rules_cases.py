"""Skip rules and fault attribution inside spawned gloo ranks (imported by the children).

One scenario per (setup, optimizer), planted after backward as in :mod:`tests.dist_cases`:

* step ``NORM_SPIKE``: every rank multiplies its local gradients by 1000 (a finite norm spike);
* step ``LOSS_SPIKE``: rank 1's targets are shifted by 5 (its loss, and the job's mean, spike);
* steps ``NAN_FROM`` on: a NaN in rank 1's local gradient every step (a faulty device): two
  overflows back off, the third in a row names rank 1 as a suspected fault.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import distscale
from distscale.errors import FaultError
from distscale.testing import count_collectives, count_host_syncs
from tests import dist_cases as dc

NORM_SPIKE, LOSS_SPIKE, NAN_FROM, STEPS = 6, 8, 10, 14
FAULTY_RANK = 1
RULES = {
    "skip_grad_norm_sigma": 6.0,
    "skip_loss_sigma": 6.0,
    "spike_window": 6,
    "spike_warmup": 4,
    "fault_repeats": 3,
}


def _step(
    model: nn.Module, scaler: Any, opt: torch.optim.Optimizer, rank: int, dp_index: int, step: int
) -> float:
    x, y = dc.batch(dp_index, step)
    if step == LOSS_SPIKE and rank == FAULTY_RANK:
        y = y + 5.0  # mislabelled: the loss jumps ~100x, the gradients stay finite
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if step == NORM_SPIKE:
        for p in model.parameters():
            if p.grad is not None:
                dc.local_tensor(p.grad).mul_(1000.0)
    if step >= NAN_FROM and rank == FAULTY_RANK:
        dc.plant(model, float("nan"))
    return float(loss)


def train_with_rules(setup: str, rank: int, world: int, optimizer: str, on_fault: str) -> dict[str, Any]:
    model, dp_index, _ = dc.build(setup, rank, world)
    opt = dc.make_optimizer(optimizer, model)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**10, growth_interval=3, on_fault=on_fault, **RULES)
    scaler.register_model(model)
    out: dict[str, Any] = {
        "metrics": [],
        "reasons": [],
        "stepped": [],
        "losses": [],
        "collectives": [],
        "host_reads": [],
        "report": None,
        "error": None,
    }
    for step in range(STEPS):
        out["losses"].append(_step(model, scaler, opt, rank, dp_index, step))
        before = dc.local_snapshot(model)
        try:
            with count_collectives() as colls, count_host_syncs() as reads:
                if optimizer == "sgd":
                    scaler.clip_grad_norm_(opt, 1e6)  # the clip's norm is the rules' norm
                scaler.step(opt)
                scaler.update()
        except FaultError as exc:
            out["error"] = (step, exc.report.rank, exc.report.kind)
            break
        after = dc.local_snapshot(model)
        out["stepped"].append(any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)))
        out["metrics"].append(scaler.metrics())
        out["reasons"].append(scaler.last_skip_reason)
        out["collectives"].append(sum(colls.values()))
        out["host_reads"].append(sum(reads.values()))
    report = scaler.last_fault_report
    if report is not None:
        site = report.site
        out["report"] = (
            report.step,
            report.kind,
            report.rank,
            site and site.host,
            site and [g.name for g in site.grads],
        )
    out["state"] = scaler.state_dict()
    return out


def job_rules(rank: int, world: int, cases: list[tuple[str, str, str]]) -> dict:
    return {case: train_with_rules(*case[:1], rank, world, *case[1:]) for case in cases}
