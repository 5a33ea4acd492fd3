"""Keeping LR schedulers and EMAs in step with the updates actually applied (distscale.skip)."""

from __future__ import annotations

import warnings

import pytest
import torch

import distscale
from distscale.skip import SkipAwareScheduler, ema_update_
from distscale.testing import count_host_syncs
from tests import tiny

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- skipped steps


def _lr_run(make_scheduler, plants: dict[int, float], steps: int, skip_aware: bool):
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(opt)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    wrapped = SkipAwareScheduler(scheduler, scaler) if skip_aware else scheduler
    lrs = []
    for step in range(steps):
        opt.zero_grad()
        tiny.backward(model, scaler, step)
        if step in plants:
            tiny.plant(model, plants[step])
        lrs.append(opt.param_groups[0]["lr"])
        scaler.step(opt)
        scaler.update()
        wrapped.step()
    return lrs, wrapped


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_skip_aware_scheduler_follows_applied_updates(name: str) -> None:
    plants = {0: INF, 3: NAN, 4: INF, 8: INF}
    steps = 12
    with warnings.catch_warnings():
        # A skipped first step must not trigger torch's "scheduler before optimizer" warning.
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        lrs, wrapped = _lr_run(SCHEDULERS[name], plants, steps, skip_aware=True)
    clean, _ = _lr_run(SCHEDULERS[name], {}, steps - len(plants), skip_aware=False)
    # The LR of each applied update is the LR the clean run used for its n-th update.
    applied = [lr for step, lr in enumerate(lrs) if step not in plants]
    assert applied == clean
    assert wrapped.last_epoch == steps - len(plants)
    assert wrapped.num_skipped == len(plants)
    assert wrapped.get_last_lr() == wrapped.scheduler.get_last_lr()
    assert wrapped.state_dict() == wrapped.scheduler.state_dict()


def test_plain_scheduler_drifts_so_the_check_above_can_fail() -> None:
    plants = {0: INF, 3: NAN}
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step"):
        lrs, _ = _lr_run(SCHEDULERS["step"], plants, 8, skip_aware=False)
    clean, _ = _lr_run(SCHEDULERS["step"], {}, 6, skip_aware=False)
    assert [lr for step, lr in enumerate(lrs) if step not in plants] != clean


def test_skip_aware_scheduler_rejects_bad_arguments() -> None:
    scaler = distscale.GradScaler("cpu")
    with pytest.raises(TypeError, match="scheduler"):
        SkipAwareScheduler(object(), scaler)
    opt = torch.optim.SGD(tiny.model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"distscale\.GradScaler"):
        SkipAwareScheduler(SCHEDULERS["step"](opt), torch.amp.GradScaler("cpu"))


def test_ema_skips_on_the_device_without_a_host_read() -> None:
    model = tiny.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    ema = [p.detach().clone() for p in model.parameters()]
    reference = [p.detach().clone() for p in model.parameters()]
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    plants = {1: INF, 2: NAN}
    for step in range(5):
        opt.zero_grad()
        tiny.backward(model, scaler, step)
        if step in plants:
            tiny.plant(model, plants[step])
        scaler.step(opt)
        scaler.update()
        before = [e.clone() for e in ema]
        with count_host_syncs() as reads:
            ema_update_(ema, model.parameters(), 0.9, scaler.step_was_skipped)
        assert sum(reads.values()) == 0
        if step in plants:
            assert all(torch.equal(a, b) for a, b in zip(before, ema, strict=True))
        else:
            ema_fn(reference, [p.detach() for p in model.parameters()], torch.tensor(step))
            for a, b in zip(ema, reference, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ema_update_(ema, model.parameters(), 0.9, True)  # a host bool works too
    with pytest.raises(ValueError, match="decay"):
        ema_update_(ema, model.parameters(), 1.5)
    with pytest.raises(ValueError, match="same length"):
        ema_update_(ema[:1], model.parameters(), 0.9)
