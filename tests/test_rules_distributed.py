"""Skip rules and fault attribution on 2 real gloo ranks, DDP and FSDP2, fused and not (one
spawned job): every rank takes the same decision for the same reason, in the step's one
collective; the fault is named on every rank; ``on_fault="raise"`` raises on every rank at once."""

from __future__ import annotations

import socket

import pytest

from distscale.testing import run_ranks
from tests import rules_cases as rc

CASES = [
    ("ddp", "sgd", "skip"),
    ("ddp", "adamw_fused", "warn"),
    ("fsdp2", "sgd", "warn"),
    ("fsdp2", "adamw_fused", "skip"),
    ("ddp", "adamw_fused", "raise"),
]
EXPECTED = [None] * rc.STEPS
EXPECTED[rc.NORM_SPIKE] = "norm_spike"
EXPECTED[rc.LOSS_SPIKE] = "loss_spike"
EXPECTED[rc.NAN_FROM : rc.NAN_FROM + 2] = ["overflow", "overflow"]  # backoffs first
EXPECTED[rc.NAN_FROM + 2 :] = ["fault"] * (rc.STEPS - rc.NAN_FROM - 2)  # the same rank again


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(rc.job_rules, 2, CASES, timeout=280)


@pytest.mark.slow
def test_rules_decide_the_same_everywhere(runs: list[dict]) -> None:
    for case in CASES[:4]:
        r0, r1 = runs[0][case], runs[1][case]
        assert r0["reasons"] == r1["reasons"] == EXPECTED, case
        assert r0["stepped"] == r1["stepped"] == [reason is None for reason in EXPECTED], case
        for step, (m0, m1) in enumerate(zip(r0["metrics"], r1["metrics"], strict=True)):
            assert m0 == pytest.approx(m1, rel=0, abs=0, nan_ok=True), (case, step)
        last = r0["metrics"][-1]
        assert (last["norm_spikes"], last["loss_spikes"], last["suspected_faults"]) == (1, 1, 2), case
        assert last["skipped_steps"] == 2 and last["fault_rank"] == rc.FAULTY_RANK, case
        scales = [m["scale"] for m in r0["metrics"]]
        # Rule skips and faults hold the scale; the two overflows back it off.
        for step in (rc.NORM_SPIKE, rc.LOSS_SPIKE, *range(rc.NAN_FROM + 2, rc.STEPS)):
            assert scales[step] == scales[step - 1], (case, step, scales)
        assert scales[rc.NAN_FROM + 1] == scales[rc.NAN_FROM - 1] / 4, (case, scales)
        # The step's loss is the mean of the ranks' losses.
        for step, m in enumerate(r0["metrics"]):
            want = (r0["losses"][step] + r1["losses"][step]) / 2
            if step < rc.NAN_FROM:
                assert m["observed_loss"] == pytest.approx(want, rel=1e-5), (case, step)
        assert r0["state"] == r1["state"], case


@pytest.mark.slow
def test_one_collective_per_step_and_syncs_as_documented(runs: list[dict]) -> None:
    for case in CASES[:4]:
        for r in runs:
            for step, (colls, reads) in enumerate(
                zip(r[case]["collectives"], r[case]["host_reads"], strict=True)
            ):
                if EXPECTED[step] == "fault":
                    continue  # the fault's gather: the only step that pays more
                assert colls == 1, (case, step, colls)
                # on_fault reads the decision once per step (shared with the non-fused step's read).
                assert reads == 1, (case, step, reads)


@pytest.mark.slow
def test_the_fault_is_named_on_every_rank(runs: list[dict]) -> None:
    for case in CASES[:4]:
        reports = [r[case]["report"] for r in runs]
        assert reports[0] == reports[1], case
        step, kind, rank, host, names = reports[0]
        assert (step, kind, rank, host) == (rc.STEPS - 1, "lone_rank", rc.FAULTY_RANK, socket.gethostname())
        assert names and all(isinstance(n, str) and n for n in names), names


@pytest.mark.slow
def test_on_fault_raise_raises_on_every_rank_at_the_same_step(runs: list[dict]) -> None:
    case = CASES[4]
    errors = [r[case]["error"] for r in runs]
    assert errors[0] == errors[1] == (rc.NAN_FROM + 2, rc.FAULTY_RANK, "lone_rank")
    assert runs[0][case]["reasons"] == runs[1][case]["reasons"] == EXPECTED[: rc.NAN_FROM + 2]
