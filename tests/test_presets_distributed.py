"""Presets on real gloo ranks: one-rank overflows give one decision and one scale trajectory."""

from __future__ import annotations

import pytest
import torch

from distscale.policy import init_state, update
from distscale.testing import run_ranks
from tests import dist_cases as dc

pytestmark = pytest.mark.slow


def reference_run(name: str, steps: int) -> tuple[list[float], int | None]:
    """The preset's rule on one process, on the flags the planted steps produce."""
    config = dc.make_preset_scaler(name).config
    state, scales = init_state(config), []
    for step in range(steps):
        events = state.num_min_scale_events.item()
        state = update(state, torch.tensor(float(step in dc.PRESET_PLANTS)), config)
        scales.append(state.scale.item())
        if config.on_min_scale == "raise" and state.num_min_scale_events.item() > events:
            return scales, step
    return scales, None


def test_presets_two_ranks_one_rank_overflows() -> None:
    steps = 12
    results = run_ranks(dc.job_presets, 2, ["ddp", "fsdp2"], steps)
    assert set(results[0]) == {(s, n) for s in ("ddp", "fsdp2") for n in dc.PRESET_SCALERS}
    for key, rank0 in results[0].items():
        label = f"{key}"
        assert results[1][key] == rank0, f"{label}: ranks differ {results[0][key]} vs {results[1][key]}"
        want_scales, want_raise = reference_run(key[1], steps)
        assert rank0["scales"] == want_scales, label
        assert rank0["raised_at"] == want_raise, label
        assert rank0["stepped"] == [step not in dc.PRESET_PLANTS for step in range(len(rank0["stepped"]))]
    # The cases do what they are there for.
    raised = {name for (_, name), r in results[0].items() if r["raised_at"] is not None}
    assert raised == {"deepspeed", "fairseq_min"}
    assert "min_scale" in results[0][("ddp", "deepspeed")]["error"]
    megatron = results[0][("ddp", "megatron")]["scales"]
    assert megatron.count(256.0) >= 3  # clamped at min_loss_scale, no error
