"""distscale.integrations.lightning with the real Lightning (pinned in the dev extra): the Trainer
and Fabric on 2 gloo ranks, fp16 on the CPU, an inf on one rank: every rank skips together;
clipping works with fused optimizers; per-step LR schedulers hold on the skipped step; the
Trainer's checkpoint carries distscale's state."""

from __future__ import annotations

import pytest
import torch

import distscale
from distscale.testing import run_ranks
from tests import integration_cases as ic

lightning = pytest.importorskip("lightning", reason='needs Lightning: pip install -e ".[dev]"')

from distscale.integrations.lightning import DistscaleFabricPrecision, DistscalePrecision  # noqa: E402


@pytest.mark.slow
def test_lightning_trainer_on_two_ranks(tmp_path) -> None:
    r0, r1 = run_ranks(ic.job_lightning_trainer, 2, str(tmp_path / "last.ckpt"))
    for case in ("fused", "plain"):
        steps = r0[case]["steps"]
        assert steps == r1[case]["steps"], case
        assert [s["skipped"] for s in steps] == [i == ic.PLANT_STEP for i in range(5)], case
        assert steps[ic.PLANT_STEP]["scale"] == steps[ic.PLANT_STEP - 1]["scale"] / 2, case
        # LambdaLR(1 / (1 + s)) stepped every step, held on the skipped one: 4 advances in 5 steps.
        assert [s["lr"] for s in steps] == pytest.approx([0.1 / 2, 0.1 / 3, 0.1 / 3, 0.1 / 4, 0.1 / 5]), case
        assert r0[case]["compute"] == ["torch.float16"], case  # "16-mixed" kept on the CPU
        assert r0[case]["params"] == r1[case]["params"], case
    assert r0["resumed_state"] == r0["plain"]["state"]


@pytest.mark.slow
def test_lightning_fabric_on_two_ranks_clips_a_fused_optimizer() -> None:
    r0, r1 = run_ranks(ic.job_lightning_fabric, 2)
    assert r0["steps"] == r1["steps"]
    assert [s["skipped"] for s in r0["steps"]] == [i == ic.PLANT_STEP for i in range(5)]
    assert r0["params"] == r1["params"]


def test_plugins_take_a_scaler_or_its_arguments() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=8.0)
    assert DistscalePrecision("cpu", scaler).scaler is scaler
    assert DistscaleFabricPrecision("cpu", init_scale=4.0).scaler.config.init_scale == 4.0
    with pytest.raises(TypeError, match="pass a scaler or scaler_kwargs, not both"):
        DistscalePrecision("cpu", scaler, init_scale=2.0)
    with pytest.raises(TypeError, match=r"distscale\.GradScaler, got GradScaler"):
        DistscalePrecision("cpu", torch.amp.GradScaler("cpu"))


def test_clipping_by_value_is_refused_for_fused_optimizers() -> None:
    plugin = DistscalePrecision("cpu")
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), fused=True)
    with pytest.raises(RuntimeError, match="gradient_clip_algorithm='value' needs unscaled gradients"):
        plugin.clip_gradients(opt, 1.0, lightning.pytorch.utilities.GradClipAlgorithmType.VALUE)


@pytest.mark.slow
def test_lightning_model_parallel_fsdp2_on_two_ranks(tmp_path) -> None:
    """ModelParallelStrategy (FSDP2) takes the plugin's fp16 on the CPU (Lightning's precision flags
    refuse "16-mixed" with it): both ranks skip together, the Trainer resumes from its sharded
    checkpoint with the scaler's state, Fabric's sharded save and fabric_load carry it."""
    r0, r1 = run_ranks(ic.job_lightning_model_parallel, 2, str(tmp_path))
    trainer = r0["trainer"]
    assert trainer["param_type"] == "DTensor"
    assert trainer["steps"] == r1["trainer"]["steps"]
    assert [s["skipped"] for s in trainer["steps"]] == [i == ic.PLANT_STEP for i in range(5)]
    assert trainer["steps"][ic.PLANT_STEP]["scale"] == trainer["steps"][ic.PLANT_STEP - 1]["scale"] / 2
    assert trainer["params"] == r1["trainer"]["params"]
    # The resumed run continues the saved scaler (5 updates, growth tracker 2): its sixth update is
    # the third clean step since the skip, so the scale grows (a fresh scaler would be at 1 update).
    assert trainer["resumed_start"] == 6 and len(trainer["resumed_steps"]) == 1
    assert trainer["resumed_steps"][0]["scale"] == 2 * trainer["steps"][-1]["scale"]
    fabric = r0["fabric"]
    assert fabric["steps"] == r1["fabric"]["steps"]
    assert [s["skipped"] for s in fabric["steps"]] == [i == ic.PLANT_STEP for i in range(5)]
    assert fabric["steps"][ic.PLANT_STEP]["norm"] == float("inf")  # the same on both ranks
    # fabric_load restores the scaler from the sharded checkpoint (fabric.load alone puts the dict
    # in its place and leaves the scaler at its initial state).
    assert fabric["loaded"] == fabric["saved"] and r1["fabric"]["loaded"] == r1["fabric"]["saved"]
    assert fabric["scaler_kept"]
    assert fabric["params_equal"] and r1["fabric"]["params_equal"]


@pytest.mark.slow
def test_lightning_fsdp1_on_two_ranks(tmp_path) -> None:
    """Lightning's FSDP strategy with DistscaleFSDPPrecision (Lightning's FSDPPrecision refuses a
    scaler, and clipping by norm): both ranks skip together, clipping by norm works with a fused
    optimizer, the checkpoint resumes the scaler; Fabric's sharded save and fabric_load carry it."""
    r0, r1 = run_ranks(ic.job_lightning_fsdp1, 2, str(tmp_path))
    trainer = r0["trainer"]
    assert trainer["wrapped"] == "FullyShardedDataParallel"
    assert trainer["steps"] == r1["trainer"]["steps"]
    assert [s["skipped"] for s in trainer["steps"]] == [i == ic.PLANT_STEP for i in range(5)]
    assert trainer["steps"][ic.PLANT_STEP]["scale"] == trainer["steps"][ic.PLANT_STEP - 1]["scale"] / 2
    assert (
        trainer["resumed_start"] == 6
        and trainer["resumed_steps"][0]["scale"] == 2 * trainer["steps"][-1]["scale"]
    )
    fabric = r0["fabric"]
    assert fabric["steps"] == r1["fabric"]["steps"]
    assert [s["skipped"] for s in fabric["steps"]] == [i == ic.PLANT_STEP for i in range(5)]
    assert fabric["steps"][ic.PLANT_STEP]["norm"] == float("inf")
    assert fabric["loaded"] == fabric["saved"] and r1["fabric"]["loaded"] == r1["fabric"]["saved"]
    assert fabric["params_equal"] and r1["fabric"]["params_equal"]


def test_fsdp_plugins_accept_the_scaler_lightning_refuses() -> None:
    from lightning.fabric.plugins.precision.fsdp import FSDPPrecision as FabricFSDPPrecision
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision

    from distscale.integrations.lightning import DistscaleFabricFSDPPrecision, DistscaleFSDPPrecision

    for lightning_cls in (FSDPPrecision, FabricFSDPPrecision):  # Lightning 2.6 reads self.precision first
        with pytest.raises(ValueError, match="'16-mixed'` does not use a scaler"):
            lightning_cls("16-mixed", scaler=distscale.GradScaler("cpu"))
    for cls in (DistscaleFSDPPrecision, DistscaleFabricFSDPPrecision):
        plugin = cls("cpu", init_scale=8.0)
        assert plugin.scaler is plugin.distscale_scaler and plugin.scaler.get_scale() == 8.0
        assert plugin.mixed_precision_config.param_dtype == torch.float16
        with plugin.forward_context():
            assert torch.is_autocast_enabled("cpu")  # Lightning's FSDP plugins autocast "cuda" only
