"""distscale.integrations.transformers with the real transformers Trainer (pinned in the dev extra):
every rank skips together, the Trainer's LR scheduler holds on the skipped step (its default fused
AdamW and the plain one), and resume_from_checkpoint restores distscale's state."""

from __future__ import annotations

import pytest

from distscale.testing import run_ranks
from tests import integration_cases as ic

transformers = pytest.importorskip("transformers", reason='needs transformers: pip install -e ".[dev]"')

from distscale.integrations.transformers import use_distscale  # noqa: E402


@pytest.mark.slow
def test_trainer_on_two_ranks_skips_together_and_the_scheduler_holds(tmp_path) -> None:
    r0, r1 = run_ranks(ic.job_trainer, 2, str(tmp_path))
    for optim in ("adamw_torch_fused", "adamw_torch"):
        steps = r0[optim]["steps"]
        assert steps == r1[optim]["steps"], optim
        assert [s["skipped"] for s in steps] == [i == ic.PLANT_STEP for i in range(5)], optim
        assert steps[ic.PLANT_STEP]["scale"] == steps[ic.PLANT_STEP - 1]["scale"] / 2, optim
        # Linear decay from 0.1 over 5 steps; the skipped step leaves the LR where it was.
        assert [s["lr"] for s in steps] == pytest.approx([0.08, 0.06, 0.06, 0.04, 0.02]), optim
        assert r0[optim]["params"] == r1[optim]["params"], optim
    assert r0["resumed_state"] == r0["adamw_torch_fused"]["state"]


def test_use_distscale_needs_an_fp16_trainer(tmp_path) -> None:
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = transformers.Trainer(model=ic._TrainerModel(), args=args)
    with pytest.raises(ValueError, match=r"trainer.args.fp16 is False.*TrainingArguments\(fp16=True\)"):
        use_distscale(trainer)
    with pytest.raises(TypeError, match="transformers Trainer"):
        use_distscale(object())
