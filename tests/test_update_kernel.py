"""The fused update (distscale.kernels.update_triton) against the torch rule it mirrors.

On CPU the kernel runs in Triton's interpreter, in a subprocess started with ``TRITON_INTERPRET=1``
(this file run as a script; see tests/test_kernels.py for why), which reports JSON. It must agree
bit for bit with ``policy.update`` + ``stats.update_stats`` on random sequences for every rule
variant, and a whole scaler run with ``kernel="triton"`` must match ``kernel="torch"``. On a GPU
(marker ``gpu``) the same scaler comparison runs compiled.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _configs() -> dict[str, Any]:
    from distscale.config import ScalerConfig

    return {
        "torch-defaults": ScalerConfig(),
        "hysteresis": ScalerConfig(init_scale=2.0**10, growth_interval=3, hysteresis=2),
        "deepspeed-like": ScalerConfig(
            init_scale=2.0**10, growth_interval=2, hysteresis=3, hysteresis_refill="clean_step",
            growth_delay=1, min_scale=1.0, max_scale=2.0**12,
        ),
        "fairseq-like": ScalerConfig(
            init_scale=8.0, growth_interval=2, min_scale=1.0, min_scale_rule="refuse", tolerance=0.25,
            growth_factor=1.5, backoff_factor=0.7,
        ),
        "min-floor-odd-bounds": ScalerConfig(
            init_scale=16.0, growth_interval=1, min_scale=0.3, max_scale=100.0, backoff_factor=0.3,
        ),
        "near-float32-max": ScalerConfig(init_scale=3.0e38, growth_interval=1),
    }  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.is_floating_point() and bool(torch.isnan(a)) and bool(torch.isnan(b))
    return a.dtype == b.dtype and (nan or torch.equal(a, b))


def _rule_sequences(steps: int = 300) -> dict[str, str | None]:
    from distscale import policy, stats
    from distscale.kernels import update_triton

    out: dict[str, str | None] = {}
    for index, (name, config) in enumerate(_configs().items()):
        rng = random.Random(index)
        ref_state, ref_stats = policy.init_state(config), stats.init_stats()
        state, st = policy.init_state(config), stats.init_stats()
        out[name] = None
        for step in range(steps):
            found = torch.tensor(1.0 if rng.random() < 0.35 else 0.0)
            kw: dict[str, Any] = {}
            if rng.random() < 0.5:
                kw["grad_norm"] = torch.tensor(rng.random() * 10, dtype=torch.float32)
            if rng.random() < 0.3:
                kw["underflow"] = (torch.tensor(rng.random(), dtype=torch.float64), torch.tensor(1e-3))
            if rng.random() < 0.5:
                kw["overflows"] = torch.tensor(int(found) * rng.randint(1, 3))
            ref_state = policy.update(ref_state, found, config)
            ref_stats = stats.update_stats(ref_stats, stats.StepOutcome(found, **kw), ref_state.scale, config)
            update_triton.update_(state, st, found, config, **kw)
            names = (*policy.ScaleState._fields, *stats.ScalerStats._fields)
            for a, b, field in zip((*ref_state, *ref_stats), (*state, *st), names, strict=True):
                if not _same(a, b):
                    out[name] = f"step {step}: {field} torch {a} kernel {b}"
                    break
            if out[name] is not None:
                break
    return out


def _scaler_run(kernel: str, device: str) -> dict[str, Any]:
    """A short fp32 run, inf/NaN planted; the scaler's state and metrics per step. No clipping: the
    fused norm is not bitwise torch's, and this compares the update, not the norm."""
    import distscale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler(
        device, init_scale=2.0**8, growth_interval=2, hysteresis=2, min_scale=1.0, kernel=kernel,
        underflow_every=3,
    )  # fmt: skip
    plants = {1: float("inf"), 2: float("nan"), 5: float("inf")}
    records = []
    for step in range(8):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 8, generator=gen).to(device)).pow(2).mean()).backward()
        if step in plants:
            model[0].weight.grad.view(-1)[0] = plants[step]
        scaler.step(opt)
        scaler.update()
        records.append(scaler.metrics())
    params = [p.detach().cpu().tolist() for p in model.parameters()]
    return {"records": records, "params": params, "state": scaler.state_dict()}


def _interpreter_main() -> None:
    from distscale import kernels

    cpu = torch.device("cpu")
    report: dict[str, Any] = {"selected": kernels.backend("triton", cpu, torch.float32) == "triton"}
    report["sequences"] = _rule_sequences()
    fused, plain = _scaler_run("triton", "cpu"), _scaler_run("torch", "cpu")
    report["scaler_equal"] = json.dumps(fused, sort_keys=True) == json.dumps(plain, sort_keys=True)
    report["scaler_skipped"] = sum(r["step_was_skipped"] for r in fused["records"])
    print("RESULT " + json.dumps(report))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"interpreter subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("name", sorted(_configs()))
def test_fused_update_is_bitwise_the_torch_rule(interpreted: dict[str, Any], name: str) -> None:
    assert interpreted["selected"]
    assert interpreted["sequences"][name] is None, interpreted["sequences"][name]


def test_scaler_with_the_fused_update_matches_the_torch_rule(interpreted: dict[str, Any]) -> None:
    assert interpreted["scaler_skipped"] == 3
    assert interpreted["scaler_equal"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tier runs the interpreter)"
)
def test_fused_update_on_gpu_matches_the_torch_rule() -> None:
    fused, plain = _scaler_run("triton", "cuda"), _scaler_run("torch", "cuda")
    assert sum(r["step_was_skipped"] for r in fused["records"]) == 3
    assert json.dumps(fused, sort_keys=True) == json.dumps(plain, sort_keys=True)


if __name__ == "__main__":
    _interpreter_main()
