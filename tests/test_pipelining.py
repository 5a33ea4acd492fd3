"""Loss scaling inside torch.distributed.pipelining schedules (distscale.pipelining): the wrapped
loss keeps its value and scales its gradient bitwise; on 2 gloo ranks, GPipe, 1F1B, interleaved
1F1B and zero-bubble V schedules log unscaled losses, accumulate exactly, count every stage in the
norm, skip together, and resume bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distscale
from distscale.testing import run_ranks
from tests import layout_cases as lc


def test_scale_loss_fn_keeps_the_value_and_scales_the_gradient_bitwise() -> None:
    """On one process: the wrapped loss's backward gives exactly scale(loss).backward()'s grads."""
    results = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        scaler = distscale.GradScaler("cpu", init_scale=2.0**13)
        x, y = torch.randn(5, 8), torch.randn(5, 3)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        if wrapped:
            loss = scaler.scale_loss_fn(lc.loss_fn)(out, y)
            loss.backward()
        else:
            loss = lc.loss_fn(out, y)
            scaler.scale(loss).backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain_grads), (loss, grads) = results
    assert torch.equal(loss, plain_loss)  # the value is not scaled
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    disabled = distscale.GradScaler("cpu", enabled=False).scale_loss_fn(lc.loss_fn)
    assert disabled.scale is None
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        distscale.GradScaler("cpu").scale_loss_fn("mse")  # type: ignore[arg-type]


def test_pipeline_scaler_unscale_works_on_a_stage_that_never_scales_a_loss() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=4.0)
    scaler.scale_loss_fn(lc.loss_fn)  # places the scale: a first stage computes no loss
    param = nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 8.0)
    opt = torch.optim.SGD([param], lr=1.0)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(param.detach(), torch.full((2,), -1.0))


PLANTS_PP = {1: 1, 3: 0}  # step -> rank of the pipeline cases (layout_cases._pipeline_train)


@pytest.mark.slow
def test_pipeline_stages_on_two_ranks() -> None:
    results = run_ranks(lc.job_pipeline, 2)
    for schedule in lc.SCHEDULES:
        exact = [out[("exact", schedule)] for out in results]
        assert sum(e["num_losses"] for e in exact) == lc.MICROBATCHES, schedule  # on the last stage
        for rank, e in enumerate(exact):
            assert e["losses_equal"], f"{schedule} rank {rank}: logged losses are not the unscaled ones"
            assert e["grads_exact"], f"{schedule} rank {rank}: accumulated grads are not scale x grads"
            got, full = e["norm"]
            assert got == pytest.approx(full, rel=1e-5), f"{schedule} rank {rank}"
        for optimizer in ("sgd", "adamw_fused"):
            runs = [out[("train", schedule, optimizer)] for out in results]
            lc.check_training(f"{schedule}/{optimizer}", runs, PLANTS_PP, optimizer != "sgd")


PLANTS_PP = {1: 1, 3: 0}  # step -> rank of the pipeline cases (layout_cases._pipeline_train)
