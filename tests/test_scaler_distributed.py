"""Tier 2: real gloo ranks (spawn), inf/NaN planted in one rank's local grad shard after backward.

Each test is one spawned job that runs many setups, so the suite pays ``import torch`` per rank
only a few times.
"""

from __future__ import annotations

import math

import pytest
import torch

from distscale.testing import run_ranks
from tests import dist_cases as dc

pytestmark = pytest.mark.slow

# FSDP1's CPUOffload pins host memory, which torch refuses without an accelerator.
CPU_ONLY_SKIP = {
    "fsdp1_offload": "FSDP1 CPUOffload needs an accelerator (pinned host buffers, device streams)"
}


def _check_matrix(results: list[dict], world: int) -> None:
    plants = dc.PLANTS_2 if world == 2 else dc.PLANTS_4
    for key in results[0]:
        setup, _, variant = key
        runs = [r[key] for r in results]
        label = f"{setup} {dict(variant)}"
        assert all(r["error"] is None for r in runs), f"{label}: {[r['error'] for r in runs]}"
        for r in runs[1:]:
            assert r["scales"] == runs[0]["scales"], f"{label}: scales diverged {[x['scales'] for x in runs]}"
            assert r["stepped"] == runs[0]["stepped"], f"{label}: skip decisions diverged"
        stepped = runs[0]["stepped"]
        for step in range(len(stepped)):
            assert stepped[step] == (step not in plants), f"{label}: step {step} stepped={stepped[step]}"
        # The scale backs off exactly at the planted steps (hysteresis 1).
        scales = [2.0**10, *runs[0]["scales"]]
        for step in plants:
            assert scales[step + 1] == scales[step] / 2, f"{label}: no backoff at step {step}: {scales}"
        fused = dict(variant)["optimizer"] != "sgd"
        # The first norm reads its layout flags once (every rank raises together if some rank
        # cannot count its parameters); a non-fused step() reuses that read.
        reads = [0 if fused else 1] * len(stepped)
        if fused and dict(variant).get("clip"):
            reads[0] = 1
        # Persistent grad objects take the lean path (the last step's layout reused) from the
        # third step on, so the checks above cover it: DDP's bucket views always, the others
        # with zero_grad(set_to_none=False). FSDP1's flat parameters are rebuilt every step.
        if setup == "ddp_bucket_view" or (
            dict(variant).get("persistent_grads") and setup in ("ddp", "fsdp2", "hsdp", "fsdp1_no_shard")
        ):
            assert all(all(r["lean"][3:]) for r in runs), f"{label}: lean path {[r['lean'] for r in runs]}"
        for r in runs:
            assert r["collectives"] == [1] * len(stepped), f"{label}: collectives per step {r['collectives']}"
            assert r["host_reads"] == reads, f"{label}: host reads {r['host_reads']}"


def test_two_ranks_ddp_fsdp1_fsdp2() -> None:
    setups = [s for s in dc.MATRIX_2 if s not in CPU_ONLY_SKIP]
    results = run_ranks(dc.job_matrix, 2, setups, ["distscale"])
    assert {key[0] for key in results[0]} == set(setups)
    _check_matrix(results, 2)


def test_four_ranks_hsdp_and_tensor_parallel() -> None:
    results = run_ranks(dc.job_matrix, 4, dc.MATRIX_4, ["distscale"])
    _check_matrix(results, 4)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason=CPU_ONLY_SKIP["fsdp1_offload"] + "; runs in the GPU tier"
)
def test_fsdp1_cpu_offload() -> None:  # pragma: no cover - needs an accelerator
    _check_matrix(run_ranks(dc.job_matrix, 2, ["fsdp1_offload"], ["distscale"]), 2)


def test_peer_scalers_diverge_where_distscale_does_not() -> None:
    """The same harness detects the divergence of torch's scalers (so the checks above can fail)."""
    results = run_ranks(dc.job_matrix, 2, ["fsdp1"], ["torch", "sharded"])
    sgd = (("optimizer", "sgd"),)
    torch_runs = [r[("fsdp1", "torch", sgd)] for r in results]
    assert torch_runs[0]["scales"] != torch_runs[1]["scales"], "plain GradScaler under FSDP1 should diverge"
    fused = (("optimizer", "adamw_fused"),)
    sharded_runs = [r[("fsdp1", "sharded", fused)] for r in results]
    assert sharded_runs[0]["stepped"] != sharded_runs[1]["stepped"], (
        "ShardedGradScaler + fused should diverge"
    )


def test_norm_counts_every_element_once() -> None:
    setups2 = ["ddp", "ddp_bucket_view", "fsdp1", "fsdp1_orig", "fsdp1_no_shard", "fsdp2"]
    for world, setups in ((2, setups2), (4, dc.MATRIX_4)):
        results = run_ranks(dc.job_norms, world, setups)
        for key in results[0]:
            values = [r[key] for r in results]
            for got, want in values:
                assert math.isclose(got, want, rel_tol=1e-5), (
                    f"{key} world={world}: got {got}, full-grad norm {want}"
                )
            assert len({got for got, _ in values}) == 1, f"{key}: ranks disagree on the norm {values}"


def test_multi_optimizer_one_collective_and_consistency_check() -> None:
    results = run_ranks(dc.job_multi_optimizer, 2)
    assert results[0]["scales"] == results[1]["scales"]
    assert results[0]["scales"][3] == results[0]["scales"][2] / 2  # inf in opt_b's grads, rank 0 only
    for r in results:
        # Step 0 learns the optimizer set (two collectives); every later step needs one.
        assert r["collectives"][0] == 2 and r["collectives"][1:] == [1] * 5, r["collectives"]
        assert r["host_reads"] == [1] * 6, r["host_reads"]  # SGD reads once; fused AdamW none

    messages = run_ranks(dc.job_consistency_check, 2)
    for message in messages:
        assert "ranks [1]" in message and "scale" in message, message


def test_resume_through_dcp_is_bitwise_identical(tmp_path) -> None:
    k, total = 4, 9
    full = run_ranks(dc.job_resume, 2, "full", str(tmp_path), k, total)
    run_ranks(dc.job_resume, 2, "save", str(tmp_path), k, total)
    resumed = run_ranks(dc.job_resume, 2, "resume", str(tmp_path), k, total)
    for rank in range(2):
        for setup in dc.RESUME_SETUPS:
            a, b = full[rank][setup], resumed[rank][setup]
            assert b["states"] == a["states"][k:], f"{setup} rank {rank}: scaler state after resume differs"
            for p, q in zip(a["params"], b["params"], strict=True):
                assert torch.equal(p, q), f"{setup} rank {rank}: parameters differ after resume"
    # The run exercised what the resume must carry: hysteresis absorbing, then backing off.
    states = full[0]["ddp"]["states"]
    assert any(s["hysteresis_tracker"] == 1 for s in states[:k]) and states[-1]["num_skipped"] == 5
