"""Spawned-rank jobs of the framework integration tests (2 gloo ranks each, CPU, fp16 autocast):
the framework's own training loop, an inf planted in one rank's gradient after backward."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

INF = float("inf")
PLANT_STEP, PLANT_RANK = 2, 1


def _framework_env(rank: int, world: int) -> None:
    # What torchrun would export: the frameworks read it (the process group already exists).
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def job_accelerate(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """accelerate's DDP loop with distscale installed before and after prepare(), plain and fused
    AdamW; then save_state and load_state into a fresh accelerator."""
    _framework_env(rank, world)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from distscale.integrations.accelerate import use_distscale

    out: dict[str, Any] = {}
    for when in ("before", "after"):
        for fused in (False, True):
            AcceleratorState._reset_state(True)  # one accelerator per case in this process
            accelerator = Accelerator(mixed_precision="fp16", cpu=True)
            model = _model()
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            if when == "before":
                scaler = use_distscale(accelerator, init_scale=2.0**10, growth_interval=3)
            model, opt, sched = accelerator.prepare(model, opt, sched)
            if when == "after":
                scaler = use_distscale(accelerator, init_scale=2.0**10, growth_interval=3)
            compute: list[torch.dtype] = []  # the first layer's dtype (prepare() returns fp32 outputs)
            accelerator.unwrap_model(model)[0].register_forward_hook(
                lambda module, args, output, seen=compute: seen.append(output.dtype)
            )
            steps = []
            for step in range(5):
                output = model(_batch(rank, step))  # no explicit autocast: prepare()'s wrapper
                accelerator.backward(output.float().pow(2).mean())
                if step == PLANT_STEP and rank == PLANT_RANK:
                    next(model.parameters()).grad.view(-1)[0] = INF
                opt.step()
                sched.step()
                opt.zero_grad()
                steps.append(
                    {
                        "skipped": opt.step_was_skipped,
                        "accelerator_skipped": accelerator.optimizer_step_was_skipped,
                        "scale": scaler.get_scale(),
                        "lr": sched.get_last_lr()[0],
                        "compute_dtype": str(compute[-1]),
                    }
                )
            case = f"{when}-{'fused' if fused else 'plain'}"
            out[case] = {
                "steps": steps,
                "params": [p.detach().tolist() for p in model.parameters()],
                "accelerator_scaler_is_ours": accelerator.scaler is scaler and opt.scaler is scaler,
            }
            if case == "after-fused":  # save here, load into a fresh accelerator below
                accelerator.save_state(ckpt_root)
                out["saved"] = scaler.state_dict()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    scaler = use_distscale(accelerator)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model, opt = accelerator.prepare(model, opt)
    accelerator.load_state(ckpt_root)
    out["loaded"] = scaler.state_dict()
    return out
