"""distscale.integrations.accelerate with the real accelerate (pinned in the dev extra): every rank
skips together, accelerate sees the skip (also with fused optimizers, so its LR scheduler holds),
installed before or after prepare(), and save_state/load_state carry distscale's state."""

from __future__ import annotations

import logging

import pytest
import torch

import distscale
from distscale.testing import run_ranks
from tests import integration_cases as ic

INF = float("inf")

accelerate = pytest.importorskip("accelerate", reason='needs accelerate: pip install -e ".[dev]"')

from distscale.integrations.accelerate import use_distscale  # noqa: E402


@pytest.fixture
def fresh_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_accelerate_on_two_ranks_skips_together_and_the_scheduler_holds(tmp_path) -> None:
    results = run_ranks(ic.job_accelerate, 2, str(tmp_path / "ckpt"))
    r0, r1 = results
    for case in ("before-plain", "before-fused", "after-plain", "after-fused"):
        steps = r0[case]["steps"]
        assert steps == r1[case]["steps"], case  # same decisions, scales and LRs on both ranks
        assert [s["skipped"] for s in steps] == [s == ic.PLANT_STEP for s in range(5)], case
        assert [s["accelerator_skipped"] for s in steps] == [s["skipped"] for s in steps], case
        assert steps[ic.PLANT_STEP]["scale"] == steps[ic.PLANT_STEP - 1]["scale"] / 2, case
        # LambdaLR(1 / (1 + s)) advances on applied steps only (accelerate steps it once per
        # process, 2 here): 4 applied of 5, the skipped one holds the LR.
        assert [s["lr"] for s in steps] == pytest.approx([0.1 / 3, 0.1 / 5, 0.1 / 5, 0.1 / 7, 0.1 / 9]), case
        assert all(s["compute_dtype"] == "torch.float16" for s in steps), case  # fp16 on the CPU
        # accelerator.clip_grad_norm_ went through distscale's clip: the job-wide norm, inf on
        # both ranks at the planted step (torch's clip would give rank 0 a finite one).
        assert [s["norm"] == s["scaler_norm"] for s in steps if s["norm"] == s["norm"]] == [True] * 5, case
        assert [s["norm"] == INF for s in steps] == [s == ic.PLANT_STEP for s in range(5)], case
        assert r0[case]["params"] == r1[case]["params"], case  # DDP replicas stay identical
        assert r0[case]["accelerator_scaler_is_ours"], case
    assert r0["loaded"] == r0["saved"] and r1["loaded"] == r1["saved"]


def test_use_distscale_refuses_what_would_bypass_the_scaler(fresh_state) -> None:
    with pytest.raises(ValueError, match=r"mixed_precision is 'bf16'.*mixed_precision=\"fp16\""):
        use_distscale(accelerate.Accelerator(mixed_precision="bf16", cpu=True))
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(mixed_precision="fp16", cpu=True)
    with pytest.raises(TypeError, match="pass a scaler or scaler_kwargs, not both"):
        use_distscale(accelerator, distscale.GradScaler("cpu"), init_scale=2.0)
    with pytest.raises(TypeError, match=r"accelerate\.Accelerator"):
        use_distscale(object())


def test_use_distscale_turns_fp16_on_on_the_cpu_and_says_so(fresh_state, caplog) -> None:
    accelerator = accelerate.Accelerator(mixed_precision="fp16", cpu=True)
    assert accelerator.scaler is None and not accelerator.native_amp  # accelerate's silent fp32
    with caplog.at_level(logging.WARNING, logger="distscale"):
        scaler = use_distscale(accelerator, init_scale=2.0**8)
    assert "turned fp16 mixed precision off on cpu" in caplog.text
    assert accelerator.native_amp and accelerator.scaler is scaler and scaler.get_scale() == 2.0**8
    with accelerator.autocast():
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
