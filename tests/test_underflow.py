"""The underflow monitor (distscale.underflow): exact fractions, only on monitor steps."""

from __future__ import annotations

import math

import pytest
import torch

import distscale
from tests import tiny

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- underflow monitor


def test_underflow_fractions_are_exact_and_only_on_monitor_steps(monkeypatch) -> None:
    from distscale import underflow

    calls = []
    real_count = underflow.count
    monkeypatch.setattr(underflow, "count", lambda *a: calls.append(1) or real_count(*a))
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = distscale.GradScaler("cpu", init_scale=1.0, underflow_every=3)
    numel = sum(p.numel() for p in model.parameters())
    for step in range(7):
        opt.zero_grad()
        tiny.backward(model, scaler, step)
        grad = model[0].weight.grad.view(-1)
        grad[:10] = 0.0  # zeros
        grad[10:13] = 2.0**-25  # flushes to zero in fp16 (ties to even)
        grad[13:15] = -(2.0**-26)
        grad[15] = 2.0**-24  # the smallest fp16 subnormal: survives
        scaler.step(opt)
        scaler.update()
        m = scaler.metrics()
        if step % 3 == 0:
            zeros = sum(int((p.grad == 0).sum()) for p in model.parameters())
            assert zeros >= 10
            assert m["zero_fraction"] == pytest.approx(zeros / numel, rel=1e-6)
            assert m["underflow_fraction"] == pytest.approx(5 / numel, rel=1e-6)
    assert len(calls) == 3, "counted on updates 0, 3 and 6 only"


def test_underflow_every_is_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="underflow_every"):
            distscale.GradScaler("cpu", underflow_every=bad)


def test_underflow_counts_fp16_gradients_as_zeros() -> None:
    from distscale import underflow

    t = torch.tensor([0.0, 2.0**-24, 1.0, 0.0], dtype=torch.float16)
    assert underflow.count([t], torch.device("cpu")).tolist() == [2.0, 0.0, 4.0]
    assert all(math.isnan(f) for f in underflow.fractions(torch.zeros(3, dtype=torch.float64)))
