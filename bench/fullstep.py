"""The whole scaler step on a small model: distscale.GradScaler vs torch.amp.GradScaler.

Same model, data and seed for both; fp16 autocast forward and backward run untimed, then the
timed region is the scaler's part of the step with clipping:

- distscale: ``clip_grad_norm_(opt, max_norm)`` → ``step`` → ``update``
- torch:     ``unscale_(opt)`` → ``torch.nn.utils.clip_grad_norm_(foreach=True)`` → ``step`` → ``update``

with SGD (momentum; the step needs a skip decision on the host) and AdamW(fused=True) (the skip
decision stays on the device). Host syncs are counted on a separate, untimed step. After the run
the two scalers must agree on the scale and (closely) on the parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import distscale
from bench.counting import count_syncs
from bench.timing import synchronize, time_call

OPTIMIZERS = ("sgd", "adamw-fused")
SCALERS = ("distscale", "torch")
MAX_NORM = 1.0


def _model(width: int, layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1]).to(device)


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


class _Trainer:
    """One (optimizer, scaler) pair on its own copy of the model."""

    def __init__(
        self, base: nn.Module, opt_kind: str, scaler_kind: str, device: torch.device, batch: int
    ) -> None:
        self.model = copy.deepcopy(base)
        self.params = list(self.model.parameters())
        self.opt = _optimizer(opt_kind, self.model)
        cls = distscale.GradScaler if scaler_kind == "distscale" else torch.amp.GradScaler
        self.scaler = cls(device.type)
        self.kind = scaler_kind
        self.device = device
        gen = torch.Generator(device=device).manual_seed(1)
        width = self.params[0].shape[1]
        self.x = torch.randn(batch, width, device=device, generator=gen)

    def backward(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        with torch.autocast(self.device.type, dtype=torch.float16):
            loss = self.model(self.x).float().square().mean()
        self.scaler.scale(loss).backward()

    def region(self) -> None:
        if self.kind == "distscale":
            self.scaler.clip_grad_norm_(self.opt, MAX_NORM)
        else:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()

    def step(self) -> None:
        self.backward()
        self.region()


def run_steps(device: torch.device, *, width: int, layers: int, batch: int, steps: int, warmup: int = 2,
              log: Any = print) -> list[dict[str, Any]]:  # fmt: skip
    """Rows (optimizer, scaler): region device/host ms, host syncs per step, and the agreement check."""
    base = _model(width, layers, device)
    rows = []
    for opt_kind in OPTIMIZERS:
        trainers = {kind: _Trainer(base, opt_kind, kind, device, batch) for kind in SCALERS}
        timings, syncs = {}, {}
        for kind, tr in trainers.items():
            for _ in range(warmup):
                tr.step()
            tr.backward()
            with count_syncs(device) as counted:
                tr.region()
            synchronize(device)
            syncs[kind] = sum(counted.values())
            timings[kind] = time_call(lambda _i, tr=tr: tr.region(), device, reps=steps, warmup=0,
                                      before_each=tr.backward)  # fmt: skip
        scales = {k: tr.scaler.get_scale() for k, tr in trainers.items()}
        diff = max(
            float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach().cpu())
            for a, b in zip(trainers["distscale"].params, trainers["torch"].params, strict=True)
        )
        agree = scales["distscale"] == scales["torch"] and diff <= 1e-3
        for kind in SCALERS:
            t = timings[kind]
            rows.append({
                "optimizer": opt_kind, "scaler": kind, "n_tensors": len(trainers[kind].params),
                "elements": sum(p.numel() for p in trainers[kind].params),
                "device_ms": t.device_ms, "host_ms": t.host_ms, "reps": t.reps, "syncs": syncs[kind],
                "scale": scales[kind], "verified": agree, "max_rel_param_diff": diff,
            })  # fmt: skip
            log(f"  step {opt_kind:<12} {kind:<10} {t.device_ms:9.3f} ms  syncs {syncs[kind]}  agree={agree}")
    return rows
