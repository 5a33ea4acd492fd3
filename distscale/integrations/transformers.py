"""The transformers ``Trainer`` (``fp16=True``) with a distscale GradScaler.

::

    trainer = Trainer(model=model, args=TrainingArguments(..., fp16=True), ...)
    distscale.integrations.transformers.use_distscale(trainer)      # before trainer.train()
    trainer.train()

The Trainer trains through accelerate (``trainer.accelerator``, built in its constructor), so this
is :func:`distscale.integrations.accelerate.use_distscale` on that accelerator, with what that
gives: every rank skips together, ``accelerator.optimizer_step_was_skipped`` is the job-wide
decision, so the Trainer's LR scheduler does not advance on skipped steps (also with its default
fused optimizer, ``adamw_torch_fused``); fp16 autocast where accelerate would silently train in
fp32 (``use_cpu=True``); the scaler's state in the Trainer's checkpoints (``scaler.pt``, loaded on
``resume_from_checkpoint``). Needs ``pip install "distscale[transformers]"``.
"""

from __future__ import annotations

from typing import Any

from distscale.integrations import accelerate as _accelerate
from distscale.scaler import GradScaler

__all__ = ["use_distscale"]


def use_distscale(trainer: Any, scaler: GradScaler | None = None, **scaler_kwargs: Any) -> GradScaler:
    """Make ``trainer`` scale its fp16 losses with ``scaler`` (built from ``scaler_kwargs`` when None)
    and return it. Call on every rank, after building the Trainer and before ``train()``."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        raise TypeError(
            f"trainer must be a transformers Trainer (with .accelerator), got {type(trainer).__name__}."
        )
    if not getattr(trainer.args, "fp16", False):
        raise ValueError(
            "trainer.args.fp16 is False: only fp16 needs a loss scaler. Build the Trainer with "
            "TrainingArguments(fp16=True) to use distscale."
        )
    return _accelerate.use_distscale(accelerator, scaler, **scaler_kwargs)
