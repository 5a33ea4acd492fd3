"""Drive a DeepSpeed fp16 engine's loss scale with a distscale rule.

DeepSpeed's engine takes no external loss *scaler*: ZeRO 1-3 and ``FP16_Optimizer`` build their
own (``CreateLossScaler``, ``LossScaleConfig``), and ``torch_autocast`` mode builds a private
``torch.amp.GradScaler`` that it steps and updates once per parameter group. What its fp16
optimizers do take is an external loss *scale*: ``optimizer.override_loss_scale(value)`` (ZeRO
1/2/3, fused and unfused ``FP16_Optimizer``), used both to scale the loss in
``engine.backward`` and to unscale the gradients in ``step``. :class:`DeepSpeedLossScale` uses
that method and the engine's public ``was_step_applied()``:

- DeepSpeed still detects overflow and skips the step. Its flag is already job-wide (ZeRO
  all-reduces it over the data- and model-parallel groups before its ``.item()``), so every rank
  feeds the same flag to the rule and holds the same scale.
- distscale applies its rule (any preset, or torch's) to that flag and hands DeepSpeed the next
  scale; its state_dict is distscale's (save it in the engine checkpoint's ``client_state``).

DeepSpeed's own scaler must be static (``"fp16": {"enabled": true, "loss_scale": 1}``; the value is
overridden) so that it neither changes the scale nor raises at its minimum. distscale's single
collective, fused check and shard-aware clipping are not used: DeepSpeed keeps those jobs.
"""

from __future__ import annotations

from typing import Any

from distscale.scaler import GradScaler

__all__ = ["DeepSpeedLossScale"]


class DeepSpeedLossScale:
    """Sets a DeepSpeed engine's loss scale from a :class:`~distscale.GradScaler`'s rule.

    Usage::

        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)  # fp16 static
        loss_scale = DeepSpeedLossScale(engine, GradScaler.from_megatron("cpu"))
        for batch in data:
            engine.backward(engine(batch))
            engine.step()
            loss_scale.update()

    The scaler's ``device`` does not matter (its state stays on the CPU, next to DeepSpeed's
    Python-float scale); it must be enabled and is not used for ``scale``/``step`` itself.
    """

    def __init__(self, engine: Any, scaler: GradScaler) -> None:
        optimizer = getattr(engine, "optimizer", None)
        if not hasattr(optimizer, "override_loss_scale"):
            raise TypeError(
                f"DeepSpeed optimizer {type(optimizer).__name__} has no override_loss_scale(): an fp16 "
                "engine (ZeRO 1-3 or FP16_Optimizer) is needed; bf16 and fp32 need no loss scaling."
            )
        if getattr(optimizer, "dynamic_loss_scale", False):
            raise ValueError(
                "DeepSpeed's own dynamic loss scaling is on (fp16.loss_scale=0): it would raise at its "
                'minimum scale behind distscale\'s back. Set "fp16": {"loss_scale": 1} (any value > 0; '
                "distscale overrides it)."
            )
        if (
            getattr(optimizer, "torch_autocast_gradscaler", None) is not None
            or getattr(engine, "torch_autocast_z0_gradscaler", None) is not None
        ):
            raise ValueError(
                "DeepSpeed's torch_autocast mode runs its own torch.amp.GradScaler; use its fp16 section "
                "instead to drive the scale from distscale."
            )
        if not scaler.is_enabled():
            raise ValueError("The distscale GradScaler is disabled; nothing would drive the scale.")
        self.engine = engine
        self.scaler = scaler
        self._global_steps = engine.global_steps
        self._push()

    def _push(self) -> None:
        self.engine.optimizer.override_loss_scale(self.scaler.get_scale())

    def update(self) -> bool | None:
        """Call after every ``engine.step()``.

        At an accumulation boundary (the engine's ``global_steps`` moved): apply the rule to
        DeepSpeed's job-wide overflow flag (``not engine.was_step_applied()``), give DeepSpeed the
        next scale, and return whether the step was applied. Between boundaries: ``None``.
        Raises ``MinScaleError`` per the scaler's ``on_min_scale``, after setting the next scale.
        Host syncs: none on the device (DeepSpeed already read its flag; the state is on the CPU).
        """
        if self.engine.global_steps == self._global_steps:
            return None
        self._global_steps = self.engine.global_steps
        applied = bool(self.engine.was_step_applied())
        try:
            self.scaler.update(found_inf=not applied)
        finally:
            self._push()  # the next scale, also when the rule raised at its minimum
        return applied

    def get_scale(self) -> float:
        """The scale DeepSpeed uses for the next step."""
        return self.scaler.get_scale()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (see :mod:`distscale.checkpoint`)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scaler's state and hand its scale to DeepSpeed."""
        self.scaler.load_state_dict(state_dict)
        self._push()
