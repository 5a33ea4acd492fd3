"""Lightning (the Trainer and Fabric) with a distscale GradScaler: a precision plugin each.

::

    trainer = lightning.Trainer(strategy="ddp", plugins=[DistscalePrecision("cuda")], gradient_clip_val=1.0)
    fabric = lightning.Fabric(strategy="ddp", plugins=[DistscaleFabricPrecision("cuda")])
    trainer = lightning.Trainer(strategy="fsdp", plugins=[DistscaleFSDPPrecision("cuda")])  # FSDP1

Both are Lightning's own ``MixedPrecision`` plugins ("16-mixed": fp16 autocast, the loss scaled in
backward, the step and ``update`` through the scaler, the scaler's state in Lightning's
checkpoints) holding a :class:`~distscale.GradScaler`. What they add, measured against Lightning
2.6 (``tests/test_integrations_lightning.py``):

- fp16 on the CPU: given as a plugin, "16-mixed" is kept (Lightning turns the ``precision="16-mixed"``
  flag into bf16 on the CPU).
- Trainer: gradient clipping by norm goes through ``scaler.clip_grad_norm_`` (the job-wide norm,
  each element counted once whatever the sharding, in the step's single collective), and works with
  fused optimizers, which Lightning's plugin refuses to clip. Clipping by value needs unscaled
  gradients: refused, with the reason, for fused optimizers.
- Trainer: LR schedulers stepped every optimizer step (``interval="step"``, not ReduceLROnPlateau)
  hold on the steps the scaler skipped on every rank (wrapped in :class:`~distscale.SkipAwareScheduler`
  at setup; one host read per step with fused optimizers).
- Fabric: ``fabric.clip_gradients`` works with fused optimizers (the gradients are unscaled in
  place; Lightning's plugin raises). Pass it ``error_if_nonfinite=False``: its default raises on
  an overflow step, on the overflowing rank alone, while the others wait. Better, call
  ``scaler.clip_grad_norm_(optimizer, max_norm)``: the job-wide, shard-aware norm, the same on
  every rank (inf on a step that will be skipped), never raising.
- Fabric: save the scaler with the rest (``fabric.save(path, {..., "scaler": scaler})``) and load with
  :func:`fabric_load`. Lightning's sharded checkpoints (FSDP, ModelParallel) put the saved dict in
  place of the scaler instead of loading it (its single-file checkpoints load it), which would
  leave the scaler silently at its initial state.
- The ModelParallel strategy (FSDP2, with or without tensor parallelism) runs with these plugins,
  on the CPU too, although Lightning refuses the ``precision="16-mixed"`` flag with it.

Needs ``pip install "distscale[lightning]"``.
"""

from __future__ import annotations

import weakref
from typing import Any, cast

from distscale.scaler import GradScaler
from distscale.skip import SkipAwareScheduler

try:
    from lightning.fabric.plugins.precision.amp import MixedPrecision as _FabricMixedPrecision
    from lightning.fabric.plugins.precision.fsdp import FSDPPrecision as _FabricFSDPPrecision
    from lightning.pytorch.plugins.precision.amp import MixedPrecision as _TrainerMixedPrecision
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision as _TrainerFSDPPrecision
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        'distscale.integrations.lightning needs Lightning: pip install "distscale[lightning]"'
    ) from exc

__all__ = [
    "DistscaleFSDPPrecision",
    "DistscaleFabricFSDPPrecision",
    "DistscaleFabricPrecision",
    "DistscalePrecision",
    "fabric_load",
]


def _scaler(device: str, scaler: GradScaler | None, scaler_kwargs: dict[str, Any]) -> GradScaler:
    if scaler is None:
        return GradScaler(device, **scaler_kwargs)
    if scaler_kwargs:
        raise TypeError(f"pass a scaler or scaler_kwargs, not both (got {sorted(scaler_kwargs)}).")
    if not isinstance(scaler, GradScaler):
        raise TypeError(f"scaler must be a distscale.GradScaler, got {type(scaler).__name__}.")
    return scaler


def _fused(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class _Registration:
    """Registers the wrapped model with the scaler once per model object, so the shard-aware norm
    knows which ranks hold copies (DDP, FSDP1; see ``GradScaler.register_model``)."""

    def __init__(self) -> None:
        self._model: weakref.ref[Any] | None = None

    def __call__(self, scaler: GradScaler, model: Any) -> None:
        if model is not None and (self._model is None or self._model() is not model):
            scaler.register_model(model)
            self._model = weakref.ref(model)


class _TrainerHooks:
    """What distscale adds to a Trainer precision plugin (see the module docstring), shared by
    the DDP and FSDP plugins; mixed in before Lightning's class."""

    distscale_scaler: GradScaler
    _register: _Registration

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        # The strategy's model is the wrapped one (DDP, FSDP1): what the norm needs to know.
        trainer = getattr(model, "_trainer", None)
        self._register(self.distscale_scaler, trainer.strategy.model if trainer is not None else model)
        return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)  # type: ignore[misc]

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """By norm: ``scaler.clip_grad_norm_`` (job-wide, shard-aware, fused optimizers too). By
        value: Lightning's clip on the unscaled gradients (not for fused optimizers)."""
        if clip_val <= 0:
            return
        if gradient_clip_algorithm == GradClipAlgorithmType.NORM:
            self.distscale_scaler.clip_grad_norm_(optimizer, clip_val)
            return
        if _fused(optimizer):
            raise RuntimeError(
                f"gradient_clip_algorithm='value' needs unscaled gradients, and {type(optimizer).__qualname__} "
                "unscales inside its fused step. Clip by norm (gradient_clip_algorithm='norm'), which "
                "distscale folds into the fused step, or use a non-fused optimizer."
            )
        self.clip_grad_by_value(optimizer, clip_val)  # type: ignore[attr-defined]

    def connect(self, model: Any, optimizers: list[Any], lr_scheduler_configs: list[Any]) -> Any:
        """Hold per-step LR schedulers on skipped steps (see the module docstring)."""
        for config in lr_scheduler_configs:
            stepped_per_update = config.interval == "step" and not config.reduce_on_plateau
            if stepped_per_update and not isinstance(config.scheduler, SkipAwareScheduler):
                config.scheduler = SkipAwareScheduler(config.scheduler, self.distscale_scaler)
        return super().connect(model, optimizers, lr_scheduler_configs)  # type: ignore[misc]


class _FabricHooks:
    """What distscale adds to a Fabric precision plugin, shared by the DDP and FSDP plugins."""

    distscale_scaler: GradScaler
    _register: _Registration

    def backward(self, tensor: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        self._register(self.distscale_scaler, model)  # the strategy's wrapped module (DDP, FSDP1)
        super().backward(tensor, model, *args, **kwargs)  # type: ignore[misc]

    def unscale_gradients(self, optimizer: Any) -> None:
        """Unscale in place, fused optimizers included (their step then takes no ``grad_scale``)."""
        self.distscale_scaler.unscale_(optimizer)


def _fp16_autocast(device: str) -> Any:
    import torch

    return torch.autocast(device, dtype=torch.float16)


class _AmpPlugin:
    """The constructor of the "16-mixed" plugins built on Lightning's ``MixedPrecision``."""

    def __init__(self, device: str = "cuda", scaler: GradScaler | None = None, **scaler_kwargs: Any) -> None:
        self.distscale_scaler = _scaler(device, scaler, scaler_kwargs)
        # Lightning types its scaler as torch's: distscale's is a drop-in for it.
        super().__init__("16-mixed", device, cast(Any, self.distscale_scaler))  # type: ignore[call-arg]
        self._register = _Registration()


class _FSDPPlugin:
    """What the FSDP plugins set right in Lightning 2.6's ``FSDPPrecision("16-mixed", scaler=...)``:
    it refuses any scaler (it reads its precision before setting it), would drop one it kept (it
    keeps a scaler only when it builds its own), and autocasts "cuda" only."""

    def __init__(self, device: str = "cuda", scaler: GradScaler | None = None, **scaler_kwargs: Any) -> None:
        self.distscale_scaler = _scaler(device, scaler, scaler_kwargs)
        self.precision = "16-mixed"  # read by FSDPPrecision.__init__ before it sets it
        super().__init__("16-mixed", cast(Any, self.distscale_scaler))  # type: ignore[call-arg]
        self.scaler = cast(Any, self.distscale_scaler)
        self._register = _Registration()
        self._device = device

    def forward_context(self) -> Any:
        return _fp16_autocast(self._device)


class DistscalePrecision(_TrainerHooks, _AmpPlugin, _TrainerMixedPrecision):  # type: ignore[misc]
    """The Trainer's "16-mixed" precision with a distscale scaler (built on ``device`` from
    ``scaler_kwargs`` when ``scaler`` is None), for DDP, single-device and ModelParallel (FSDP2)."""


class DistscaleFSDPPrecision(_TrainerHooks, _FSDPPlugin, _TrainerFSDPPrecision):  # type: ignore[misc]
    """The Trainer's FSDP (FSDP1) "16-mixed" precision with a distscale scaler, for
    ``strategy="fsdp"`` (see ``_FSDPPlugin`` for what Lightning's own gets wrong with a scaler).
    Clipping by norm, which Lightning's refuses, goes through the scaler's shard-aware clip
    (FSDP1's flat parameters counted once)."""


class DistscaleFabricPrecision(_FabricHooks, _AmpPlugin, _FabricMixedPrecision):
    """Fabric's "16-mixed" precision with a distscale scaler (built on ``device`` from
    ``scaler_kwargs`` when ``scaler`` is None)."""


class DistscaleFabricFSDPPrecision(_FabricHooks, _FSDPPlugin, _FabricFSDPPrecision):  # type: ignore[misc]
    """Fabric's FSDP (FSDP1) "16-mixed" precision with a distscale scaler (see
    :class:`DistscaleFSDPPrecision`)."""


def fabric_load(fabric: Any, path: Any, state: dict[str, Any], **kwargs: Any) -> Any:
    """``fabric.load(path, state, **kwargs)`` that also restores the scaler (and any other object
    with ``state_dict``/``load_state_dict`` that is not a module or optimizer) from a sharded
    checkpoint, where Lightning replaces the object in ``state`` by its saved dict. Returns what
    ``fabric.load`` returns. Call it on every rank, as ``fabric.load``."""
    import torch

    stateful = {
        key: obj
        for key, obj in state.items()
        if hasattr(obj, "load_state_dict")
        and hasattr(obj, "state_dict")
        and not isinstance(obj, torch.nn.Module | torch.optim.Optimizer)
        and not hasattr(obj, "optimizer")  # Fabric's optimizer wrapper
    }
    remainder = fabric.load(path, state, **kwargs)
    for key, obj in stateful.items():
        if state.get(key) is not obj and isinstance(state.get(key), dict):
            obj.load_state_dict(state[key])
            state[key] = obj
    return remainder
