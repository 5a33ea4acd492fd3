"""Overflow diagnostics (distscale.diagnostics): which parameter held inf/NaN, and what it costs."""

from __future__ import annotations

import logging

import pytest
import torch

import distscale
from distscale import diagnostics
from distscale.testing import count_host_syncs
from tests import tiny

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- diagnostics


def test_overflow_report_names_parameters_kinds_and_counts(caplog) -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    scaler.set_parameter_names(model)
    tiny.run(scaler, model, opt, {}, 1)
    assert scaler.last_overflow_report is None
    opt.zero_grad()
    tiny.backward(model, scaler, 1)
    model[0].weight.grad.view(-1)[:3] = INF
    model[0].weight.grad.view(-1)[5] = NAN
    model[2].bias.grad[0] = NAN
    with caplog.at_level(logging.WARNING, logger="distscale"):
        scaler.step(opt)
        scaler.update()
    report = scaler.last_overflow_report
    assert report is not None and report.step == 1 and report.world_size == 1
    found = {g.name: (g.kind, g.num_inf, g.num_nan, g.numel) for g in report.grads}
    assert found == {"0.weight": ("inf+nan", 3, 1, 128), "2.bias": ("nan", 0, 1, 4)}
    assert "0.weight" in caplog.text and "2.bias" in caplog.text and "step 1" in caplog.text


def test_unnamed_parameters_get_their_optimizer_position() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    tiny.run(scaler, model, opt, {0: INF}, 1)
    assert [g.name for g in scaler.last_overflow_report.grads] == ["param_groups[0]['params'][0]"]


@pytest.mark.parametrize(("fused", "reads"), [(False, 1), (True, 1)])
def test_diagnostics_cost_on_clean_steps(monkeypatch, fused: bool, reads: int) -> None:
    scans = []
    real_scan = diagnostics.scan
    monkeypatch.setattr(diagnostics, "scan", lambda *a: scans.append(1) or real_scan(*a))
    model = tiny.model()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.01)
    )
    scaler = distscale.GradScaler("cpu", overflow_diagnostics=True)
    for step in range(3):
        opt.zero_grad()
        tiny.backward(model, scaler, step)
        with count_host_syncs() as counted:
            scaler.step(opt)
            scaler.update()
        # Non-fused: the one read step() makes anyway; fused: the one extra read diagnostics costs.
        assert sum(counted.values()) == reads, counted
    assert scans == [], "clean steps must not scan the gradients"


def test_diagnostics_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="overflow_diagnostics"):
        distscale.GradScaler("cpu", overflow_diagnostics=1)
