"""Metrics, overflow diagnostics and the underflow monitor on real gloo ranks (one spawned job for
all three: each rank costs ~1 s of import torch): every rank reads the same values, reports name
the rank and kind, fractions equal those of the full gradients, one collective per step."""

from __future__ import annotations

import math

import pytest

from distscale import stats
from distscale.testing import run_ranks
from tests import dist_cases as dc

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- real ranks


@pytest.mark.slow
def test_observability_on_two_ranks() -> None:
    setups = ["ddp", "fsdp1_orig", "fsdp2"]
    results = run_ranks(dc.job_observability, 2, setups)
    for setup in setups:
        r0, r1 = results[0][setup], results[1][setup]
        # Every rank reads the same metrics: same skip decisions, same norm, same fractions.
        for m0, m1 in zip(r0["metrics"], r1["metrics"], strict=True):
            assert m0 == pytest.approx(m1, rel=0, abs=0, nan_ok=True), setup
        skipped = [m["step_was_skipped"] for m in r0["metrics"]]
        assert skipped == [step in dc.PLANTS_2 for step in range(7)], (setup, skipped)
        assert r0["metrics"][-1]["overflows"] == len(dc.PLANTS_2)
        # grad_norm is what clip_grad_norm_ returned (under DDP a replica planted on rank 1 is
        # not counted in the norm, so a skipped step's norm may be finite there).
        for step, m in enumerate(r0["metrics"]):
            assert m["grad_norm"] == pytest.approx(r0["norms"][step], rel=1e-6, nan_ok=True), (setup, step)
            assert m["grad_norm"] > 0 or math.isnan(m["grad_norm"])
        # Diagnostics: rank 0 names the rank and kind of each planted value; rank 1 holds no report.
        for step, (plant_rank, value) in dc.PLANTS_2.items():
            report_step, grads = r0["reports"][step]
            assert report_step == step, (setup, step, r0["reports"][step])
            kind = "nan" if math.isnan(value) else "inf"
            assert [(g[0], g[2]) for g in grads] == [(plant_rank, kind)], (setup, step, grads)
            assert r1["reports"][step] is None
        # The monitor's job-wide fractions match the full gradients' (rank 0 planted them).
        for step, reference in enumerate(r0["reference"]):
            if reference is None:
                continue
            m = r0["metrics"][step]
            assert m["zero_fraction"] == pytest.approx(reference[0], rel=1e-5), (setup, step)
            assert m["underflow_fraction"] == pytest.approx(reference[1], rel=1e-5), (setup, step)
            assert reference[1] > 0
        # Clean steps, monitor steps included, keep the single collective.
        for rank_result in (r0, r1):
            clean = [c for step, c in enumerate(rank_result["collectives"]) if step not in dc.PLANTS_2]
            assert clean == [1] * len(clean), (setup, rank_result["collectives"])


@pytest.mark.slow
def test_observability_on_four_ranks_hsdp_and_tensor_parallel() -> None:
    """Replicate axes (HSDP) and TP shards: fractions counted once per element, reports per rank."""
    setups = ["hsdp", "fsdp2_tp"]
    results = run_ranks(dc.job_observability, 4, setups)
    for setup in setups:
        runs = [r[setup] for r in results]
        for step in range(7):
            values = [r["metrics"][step] for r in runs]
            assert all(v == pytest.approx(values[0], rel=0, abs=0, nan_ok=True) for v in values), (
                setup,
                step,
            )
        for step, (plant_rank, value) in dc.PLANTS_2.items():
            report_step, grads = runs[0]["reports"][step]
            kind = "nan" if math.isnan(value) else "inf"
            assert report_step == step and {(g[0], g[2]) for g in grads} == {(plant_rank, kind)}, (
                setup,
                grads,
            )
            assert all(r["reports"][step] is None for r in runs[1:])
        for step, reference in enumerate(runs[0]["reference"]):
            if reference is not None:
                m = runs[0]["metrics"][step]
                assert m["zero_fraction"] == pytest.approx(reference[0], rel=1e-5), (setup, step)
                assert m["underflow_fraction"] == pytest.approx(reference[1], rel=1e-5), (setup, step)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["fsdp2", "ddp"])
def test_amax_is_job_wide_and_rides_in_the_one_collective(setup: str) -> None:
    runs = run_ranks(dc.job_amax, 2, setup)
    for step in range(6):
        values = [r["metrics"][step] for r in runs]
        assert values[0] == pytest.approx(values[1], nan_ok=True), (setup, step)  # one decision, one state
        want = max(r["local"][step] for r in runs)  # the maximum over every rank's local shard
        assert values[0]["amax"] == pytest.approx(want, rel=1e-6), (setup, step)
    # Step 2: rank 1's planted element is the job's largest: both ranks see it.
    assert runs[1]["local"][2] > runs[0]["local"][2] and runs[0]["metrics"][2]["amax"] == runs[1]["local"][2]
    assert stats.SCALE_CHANGES[runs[0]["metrics"][0]["scale_change"]] == "calibrated"
    for r in runs:
        assert r["collectives"] == [1] * 6
        assert r["host_reads"] == [1] + [0] * 5  # fused AdamW: the first clip's layout read only
