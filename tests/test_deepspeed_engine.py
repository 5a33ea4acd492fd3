"""DeepSpeed's engine (ZeRO-1/2, 2 gloo ranks) driven by distscale's rule through
``DeepSpeedLossScale`` (distscale.deepspeed_engine), against the same engine with DeepSpeed's own
dynamic scaler."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from distscale.testing import run_ranks
from tests import dist_cases as dc

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'deepspeed')"
)
def test_deepspeed_engine_adapter_zero1_zero2() -> None:
    fp16 = {"initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 2, "min_loss_scale": 1}
    steps = 14
    results = run_ranks(dc.job_deepspeed_engine, 2, [1, 2], fp16, steps, timeout=400)
    planted = {1, 2, 3, 6, 7}
    for stage in (1, 2):
        native = [r[(stage, "native")] for r in results]
        adapter = [r[(stage, "adapter")] for r in results]
        for runs in (native, adapter):
            # Both ranks skip exactly the planted steps (the inf was on one rank) and hold one scale.
            assert runs[0]["applied"] == runs[1]["applied"] == [s not in planted for s in range(steps)]
            assert runs[0]["scales"] == runs[1]["scales"]
        # distscale's rule through the adapter = DeepSpeed's own scaler.
        assert adapter[0]["scales"] == native[0]["scales"], stage
        scales = [2.0**8, *native[0]["scales"]]
        grew = [step for step in range(steps) if scales[step + 1] > scales[step]]
        assert grew and any(b < a for a, b in itertools.pairwise(scales))
        assert scales[2] == scales[1]  # step 1: one hysteresis unit spent, no backoff
        # The weights are the same up to DeepSpeed's first growth. ZeRO-1/2's step() updates its
        # scale before unscaling, so on a growth step it divides the gradients by the *grown*
        # scale (twice the one the loss was scaled with); the adapter updates after the step.
        for rank in (0, 1):
            for step in range(grew[0]):
                pairs = zip(adapter[rank]["params"][step], native[rank]["params"][step], strict=True)
                assert all(torch.equal(a, b) for a, b in pairs), (stage, rank, step)
