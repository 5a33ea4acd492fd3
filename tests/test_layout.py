"""Which ranks count which parameters (distscale.layout, distscale.sharding) and loss scaling
inside pipeline schedules (distscale.pipelining): single-process rules, then real gloo ranks."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import distscale
from distscale.layout import Layout, refusal
from distscale.overflow import ClassificationCache, GradSet
from distscale.testing import run_ranks
from tests import layout_cases as lc

PLANTS_PP = {1: 1, 3: 0}  # step -> rank of the pipeline cases (layout_cases._pipeline_train)


def _group(ranks: tuple[int, ...], me: int) -> Any:
    return SimpleNamespace(global_ranks=ranks, global_rank=me)


# ---------------------------------------------------------------------------- one process


def test_plain_tensors_on_one_rank_count_and_on_several_are_unresolved() -> None:
    params = [nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    alone = GradSet(opt).classification
    assert alone.unresolved == [] and alone.kinds == [0, 0]
    shared = GradSet(opt, ClassificationCache(group=_group((0, 1), 1))).classification
    assert [(g, i) for g, i, _ in shared.unresolved] == [(0, 0), (0, 1)]
    assert "no mesh is declared" in shared.unresolved[0][2]
    grads = GradSet(opt, ClassificationCache(group=_group((0, 1), 1)))
    assert all(g.norm_tensor is None for g in grads.grads)  # never counted by a guess


def test_param_group_key_without_mesh_is_unresolved_with_its_reason() -> None:
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    opt = torch.optim.SGD([{"params": [param], "replicate_dims": ("dp",)}], lr=0.1)
    found = GradSet(opt, ClassificationCache(group=_group((0, 1), 0))).classification
    assert "the scaler has no mesh" in found.unresolved[0][2]


def test_classification_follows_parameter_list_and_declarations() -> None:
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    cache = ClassificationCache(group=_group((0, 1), 0))
    first = cache.classification(opt, [param])
    assert cache.classification(opt, [param]) is first  # cached
    opt.param_groups[0]["replicate_dims"] = ()  # a new declaration is a new classification
    assert cache.classification(opt, [param]) is not first


def test_refusal_names_every_rank_parameter_and_the_fix() -> None:
    found = [
        [("stage0.weight", (4, 4), "a plain tensor ...")],
        [],
        [(f"p{i}", (2,), "why") for i in range(12)],
    ]
    message = refusal(found, 3)
    assert "cannot count 13 parameter(s)" in message and "group has 3 ranks" in message
    assert "rank 0: stage0.weight [4, 4]: a plain tensor" in message
    assert "rank 2: p0 [2]: why" in message and "... and 3 more" in message
    assert "HINT" in message and "replicate_dims" in message and "register_model" in message


def test_layout_arguments_without_a_mesh() -> None:
    with pytest.raises(
        ValueError, match=r"replicate_dims=\('dp',\) names dims of a DeviceMesh, but mesh is None"
    ):
        distscale.GradScaler("cpu", replicate_dims=("dp",))
    Layout(None, None)  # nothing declared: fine


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


# ---------------------------------------------------------------------------- gloo ranks


def _check_training(label: str, runs: list[dict[str, Any]], plants: dict[int, int], fused: bool) -> None:
    """Every rank: the same states; skipped exactly on the planted steps with a backoff; one
    collective per step; host reads (the first norm's layout check, then step()'s); resume."""
    for r in runs[1:]:
        assert r["states"] == runs[0]["states"], f"{label}: scale states differ across ranks"
    scales = [2.0**10] + [s["scale"] for s in runs[0]["states"]]
    for rank, r in enumerate(runs):
        assert r["stepped"] == [n not in plants for n in range(lc.STEPS)], (
            f"{label} rank {rank}: {r['stepped']}"
        )
        assert r["collectives"] == [1] * lc.STEPS, f"{label} rank {rank}: collectives {r['collectives']}"
        reads = [1] + [0 if fused else 1] * (lc.STEPS - 1)
        assert r["host_reads"] == reads, f"{label} rank {rank}: host reads {r['host_reads']}"
        assert r["resumed_states"] == r["states"][lc.RESUME_AT :], f"{label} rank {rank}: resumed state"
        assert all(torch.equal(a, b) for a, b in zip(r["final"], r["resumed_final"], strict=True)), (
            f"{label} rank {rank}: resumed parameters differ"
        )
    for n in plants:
        assert scales[n + 1] == scales[n] / 2, f"{label}: no backoff at step {n}: {scales}"


@pytest.mark.slow
def test_pipeline_stages_on_two_ranks() -> None:
    results = run_ranks(lc.job_pipeline, 2)
    want = math.sqrt(4 * 3.0**2 + 4 * 6.0**2)  # the example: 13.42, not 6
    for rank, out in enumerate(results):
        error = out[("two_params", False)]
        assert isinstance(error, str) and "cannot count 2 parameter(s)" in error
        assert "rank 0: param_groups[0]['params'][0] [4]" in error and "rank 1:" in error
        assert out[("two_params", True)] == pytest.approx(want, rel=1e-6)
        skipped, scale, param = out["undeclared_skip"]
        assert skipped and scale == 2.0 and torch.equal(param, torch.zeros(4)), f"rank {rank}"
        assert "cannot count" in out[("ddp", False)] and "register_model" in out[("ddp", False)]
        assert isinstance(out[("ddp", True)], float)
        assert "an FSDP1 parameter (use_orig_params=True)" in out[("fsdp1_orig", False)]
        assert "not sharded (NO_SHARD)" in out[("fsdp1_no_shard", False)]
        assert isinstance(out[("fsdp1_orig", True)], float) and isinstance(out[("fsdp1_no_shard", True)], float)
    assert results[0][("two_params", False)] == results[1][("two_params", False)]
    for case in ("ddp", "fsdp1_orig", "fsdp1_no_shard"):  # registered: one job-wide norm
        assert results[0][(case, True)] == results[1][(case, True)], case
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
            _check_training(f"{schedule}/{optimizer}", runs, PLANTS_PP, optimizer != "sgd")


@pytest.mark.slow
def test_four_ranks_pipeline_fsdp2_tensor_parallel_and_experts() -> None:
    results = run_ranks(lc.job_four_ranks, 4)
    bad = results[0]["bad_input"]
    assert (
        "mesh covers ranks [0, 2], but the scaler's process group holds ranks [0, 1, 2, 3]" in bad["sub_mesh"]
    )
    assert "('data',)" in bad["unknown_dim"] and "('dp', 'tp')" in bad["unknown_dim"]
    assert "replicate_dims is required with mesh" in bad["no_dims"]
    assert "sequence of mesh dim names" in bad["string_dims"]
    assert "must have named dims" in bad["unnamed"]
    assert "mesh is None" in bad["dims_without_mesh"]
    assert bad["not_a_mesh"].startswith("TypeError: mesh must be a torch.distributed.device_mesh.DeviceMesh")
    assert all("HINT" in v for k, v in bad.items() if k not in ("string_dims", "no_dims"))
    for rank, out in enumerate(results):
        key = out["bad_input"]["bad_group_key"]
        assert f"rank {rank}: param_groups[0]['params'][0] [3]" in key and "('dq',)" in key
    for layout, (_, optimizers) in lc.LAYOUTS.items():
        refusals = [out[(layout, "undeclared")] for out in results]
        assert all(r == refusals[0] and r.startswith("cannot count") for r in refusals), (
            f"{layout}: {refusals[0]}"
        )
        for rank, out in enumerate(results):
            for (norm_type, optimizer), (got, want) in out[(layout, "norm")].items():
                assert got == pytest.approx(want, rel=1e-5), f"{layout} rank {rank} {norm_type} {optimizer}"
        plants = {n: r for n, (r, _) in lc._Case.plants.items()}
        for optimizer in optimizers:
            runs = [out[(layout, optimizer)] for out in results]
            _check_training(f"{layout}/{optimizer}", runs, plants, optimizer != "sgd")
