"""Which ranks hold copies of which parameters (distscale.layout): declared, derived or refused.

One process: the refusal message and argument checks. Real gloo ranks: different plain parameters
on 2 ranks (the norm that used to be silently wrong), DDP and FSDP1 registered or refused; and on 4
ranks PP x FSDP2, plain TP x DDP and experts (plain, DTensor, DTensor on a sub-mesh): norms equal
the full model's, one decision, one collective, bitwise resume, bad declarations refused."""

from __future__ import annotations

import math

import pytest
import torch

import distscale
from distscale.layout import Layout, refusal
from distscale.testing import run_ranks
from tests import layout_cases as lc

# ---------------------------------------------------------------------------- one process


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


# ---------------------------------------------------------------------------- gloo ranks


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
            lc.check_training(f"{layout}/{optimizer}", runs, plants, optimizer != "sgd")


@pytest.mark.slow
def test_two_ranks_with_different_plain_parameters_ddp_and_fsdp1() -> None:
    results = run_ranks(lc.job_two_ranks, 2)
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
        assert isinstance(out[("fsdp1_orig", True)], float) and isinstance(
            out[("fsdp1_no_shard", True)], float
        )
    assert results[0][("two_params", False)] == results[1][("two_params", False)]
    for case in ("ddp", "fsdp1_orig", "fsdp1_no_shard"):  # registered: one job-wide norm
        assert results[0][(case, True)] == results[1][(case, True)], case
