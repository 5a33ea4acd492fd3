"""Hugging Face accelerate with a distscale GradScaler: one call, before or after ``prepare()``.

::

    accelerator = Accelerator(mixed_precision="fp16")
    scaler = distscale.integrations.accelerate.use_distscale(accelerator)   # before or after prepare()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ...  # accelerator.backward(loss); optimizer.step(); scheduler.step(), as usual

What it fixes, measured against accelerate 1.15 (``tests/test_integrations_accelerate.py``):

- accelerate's scaler is replaced everywhere it is held: the accelerator's, and every
  ``AcceleratedOptimizer``'s, including those prepared *before* the call (accelerate copies the
  scaler into each optimizer wrapper at ``prepare()``; replacing ``accelerator.scaler`` afterwards
  leaves the old one stepping). Optimizers prepared later get it too. A torch scaler's state
  (scale, growth tracker) carries over.
- ``optimizer.step_was_skipped`` and ``accelerator.optimizer_step_was_skipped`` come from the
  scaler's job-wide decision: accelerate infers a skip from ``optimizer.step`` not being called,
  which fused optimizers (``fused=True``, transformers' ``adamw_torch_fused``) are even on skipped
  steps, so its LR scheduler advanced on them. Costs one host read per step with fused
  optimizers (the scheduler needs a Python bool), none otherwise.
- ``accelerator.clip_grad_norm_(params, max_norm)`` (what the transformers Trainer calls) clips
  through ``scaler.clip_grad_norm_`` when ``params`` are exactly one prepared optimizer's: the
  job-wide norm of the unscaled grads, every element counted once (FSDP shards, tensor and
  expert parallel layouts included; accelerate's own path unscales and calls torch's clip, which
  gives each rank its local view, and an overflowing rank a different norm than the others), in
  the step's single collective; fused optimizers' grads are only read. Other parameter sets
  (a subset of a model, several optimizers at once) keep accelerate's path. Models prepared
  before or after the call are registered with the scaler (``GradScaler.register_model``), so
  it knows which ranks hold copies.
- On the CPU, ``mixed_precision="fp16"`` builds no scaler and trains in fp32 without a word;
  here it turns fp16 autocast on (``accelerator.native_amp``, and the fp16-autocast forward
  ``prepare()`` gives models, also to those already prepared), logged as a warning.
- Anything else that would train without the scaler (bf16 or no mixed precision, DeepSpeed or
  Megatron-LM, which scale inside their engines) raises ``ValueError`` naming the setting.

``save_state``/``load_state`` then store and load distscale's state (also accelerate's FSDP2
path, which calls ``_lazy_init_scale_growth_tracker``). Needs ``pip install "distscale[accelerate]"``.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

from distscale.scaler import GradScaler

__all__ = ["use_distscale"]

log = logging.getLogger("distscale")


def use_distscale(accelerator: Any, scaler: GradScaler | None = None, **scaler_kwargs: Any) -> GradScaler:
    """Make ``accelerator`` scale its fp16 losses with ``scaler`` (built from ``scaler_kwargs`` on the
    accelerator's device when None) and return it. Call on every rank; before or after ``prepare()``.
    """
    try:
        import accelerate
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType
    except ImportError as exc:  # pragma: no cover
        raise ImportError('use_distscale needs accelerate: pip install "distscale[accelerate]"') from exc
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}.")
    if accelerator.mixed_precision != "fp16":
        raise ValueError(
            f"accelerator.mixed_precision is {accelerator.mixed_precision!r}: only fp16 needs a loss "
            'scaler. Build the Accelerator with mixed_precision="fp16" to use distscale.'
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"accelerator.distributed_type is {accelerator.distributed_type}: that engine scales the loss "
            "itself and would bypass the scaler (for DeepSpeed see distscale.deepspeed_engine)."
        )
    if scaler is None:
        scaler = GradScaler(accelerator.device.type, **scaler_kwargs)
    elif scaler_kwargs:
        raise TypeError(f"pass a scaler or scaler_kwargs, not both (got {sorted(scaler_kwargs)}).")
    previous = accelerator.scaler
    if previous is not None and previous is not scaler and getattr(previous, "_scale", None) is not None:
        scaler.load_state_dict(previous.state_dict())  # the scale a run already reached carries over
    if not accelerator.native_amp:
        # accelerate leaves fp16 off on the CPU (no scaler, fp32 compute, no warning).
        log.warning(
            "accelerate turned fp16 mixed precision off on %s; distscale turns fp16 autocast on "
            "(accelerator.native_amp = True) so the loss scaler has something to scale.",
            accelerator.device.type,
        )
        accelerator.native_amp = True
        _autocast_prepared_models(accelerator)
    accelerator.scaler = scaler
    for optimizer in accelerator._optimizers:
        if isinstance(optimizer, AcceleratedOptimizer):
            _attach(optimizer, scaler)
    for model in accelerator._models:
        # accelerate keeps the module it wrapped in DDP (over the default group), not the wrapper.
        ddp = _wraps_in_ddp(accelerator) and not getattr(model, "_is_accelerate_prepared", False)
        scaler.register_model(model, replicated_over=_world() if ddp else None)

    def attach(prepared: Any) -> None:
        # prepare() copies accelerator.scaler into each wrapper it builds: attach those as they come.
        if isinstance(prepared, AcceleratedOptimizer) and accelerator.scaler is not None:
            _attach(prepared, accelerator.scaler)

    def register(prepared: Any) -> None:
        # The clip counts each parameter once only if the scaler knows DDP's and FSDP1's groups.
        if isinstance(accelerator.scaler, GradScaler):
            accelerator.scaler.register_model(prepared)

    _after_prepare(accelerator, "prepare_optimizer", attach)
    _after_prepare(accelerator, "prepare_model", register)
    _route_clip(accelerator, AcceleratedOptimizer)
    return scaler


def _wraps_in_ddp(accelerator: Any) -> bool:
    """Whether ``prepare()`` wraps models in DDP over the default group (accelerate 1.15's rule)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        return True
    tp = accelerator.parallelism_config is not None and accelerator.parallelism_config.tp_enabled
    return bool(accelerator.multi_device) and not tp


def _world() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD


def _after_prepare(accelerator: Any, method: str, hook: Callable[[Any], None]) -> None:
    """Run ``hook`` on what each later ``accelerator.<method>(...)`` call returns (installed once
    per accelerator, however often ``use_distscale`` is called)."""
    marker = f"_distscale_{method}"
    if getattr(accelerator, marker, None) is not None:
        return
    original = getattr(accelerator, method)

    def with_distscale(*args: Any, **kwargs: Any) -> Any:
        prepared = original(*args, **kwargs)
        hook(prepared)
        return prepared

    setattr(accelerator, marker, with_distscale)
    setattr(accelerator, method, with_distscale)


def _route_clip(accelerator: Any, wrapper: Any) -> None:
    """``accelerator.clip_grad_norm_`` through the scaler's shard-aware clip (module docstring)."""
    if getattr(accelerator, "_distscale_clip", None) is not None:
        return
    accelerate_clip = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        import torch

        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        wanted = set(map(id, params))
        holders = [
            opt.optimizer
            for opt in accelerator._optimizers
            if isinstance(opt, wrapper)
            and {id(p) for group in opt.optimizer.param_groups for p in group["params"]} == wanted
        ]
        scaler = accelerator.scaler
        if len(holders) != 1 or not isinstance(scaler, GradScaler):
            return accelerate_clip(params, max_norm, norm_type)
        return scaler.clip_grad_norm_(holders[0], max_norm, norm_type)

    accelerator._distscale_clip = clip_grad_norm_
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _autocast_prepared_models(accelerator: Any) -> None:
    """Give models prepared while fp16 was off what ``prepare()`` gives them when it is on: a
    forward run under fp16 autocast, outputs returned in fp32 (accelerate's own wrappers)."""
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    for prepared in accelerator._models:
        model = accelerator.unwrap_model(prepared)
        if hasattr(model, "_original_forward"):  # already wrapped
            continue
        model._original_forward = model.forward
        autocast = get_mixed_precision_context_manager(True, accelerator.autocast_handler)
        forward = getattr(model.forward, "__func__", None)
        if forward is None:
            model.forward = convert_outputs_to_fp32(autocast(model.forward))
        else:
            model.forward = types.MethodType(convert_outputs_to_fp32(autocast(forward)), model)


def _attach(optimizer: Any, scaler: GradScaler) -> None:
    """Point one AcceleratedOptimizer at ``scaler`` and its skip flag at the scaler's decision."""
    from accelerate.optimizer import patch_optimizer_step

    optimizer.scaler = scaler
    # What AcceleratedOptimizer.__init__ sets up only when it is given a scaler.
    optimizer._accelerate_step_called = False
    optimizer._optimizer_original_step_method = optimizer.optimizer.step
    optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)
    if getattr(optimizer, "_distscale_step", None) is None:
        wrapped = type(optimizer).step

        def step(self: Any, closure: Any = None) -> Any:
            result = wrapped(self, closure)
            if self.gradient_state.sync_gradients and self.scaler is not None:
                self._is_overflow = self.scaler.last_step_skipped()  # job-wide; one read if fused
            return result

        optimizer._distscale_step = step
        optimizer.step = types.MethodType(step, optimizer)
