"""A tiny model and training loop shared by the one-process tests of what the scaler shows."""

from __future__ import annotations

import torch
from torch import nn

import distscale

INF, NAN = float("inf"), float("nan")


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def backward(model: nn.Module, scaler: distscale.GradScaler, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(4, 8, generator=gen)
    scaler.scale(model(x).pow(2).mean()).backward()


def plant(model: nn.Module, value: float) -> None:
    next(model.parameters()).grad.view(-1)[3] = value


def run(scaler, net, opt, plants: dict[int, float], steps: int, clip: float | None = None):
    """Train ``steps`` steps; return the metrics after each update."""
    out = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        backward(net, scaler, step)
        if step in plants:
            plant(net, plants[step])
        if clip is not None:
            scaler.clip_grad_norm_(opt, clip)
        scaler.step(opt)
        scaler.update()
        out.append(scaler.metrics())
    return out


# ---------------------------------------------------------------------------- SGD with momentum, one step at a time


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def one_step(scaler, model, opt, step, overflow=False):
    gen = torch.Generator().manual_seed(1000 + step)
    opt.zero_grad(set_to_none=True)
    loss = model(torch.randn(4, 6, generator=gen)).pow(2).mean()
    scaler.scale(loss).backward()
    if overflow:
        with torch.no_grad():
            model[0].weight.grad[1, 2] = INF
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale()
