"""GradScaler: torch.amp.GradScaler's API, one skip decision and one collective per step.

Per optimizer step (between two ``update()`` calls) the façade:

1. checks each optimizer's *local* gradients for inf/NaN (and unscales them in place unless the
   optimizer is fused and takes ``grad_scale``): :mod:`distscale.overflow`, no communication;
2. at the first point that needs a job-wide answer (``step``, ``clip_grad_norm_``, ``update``)
   issues **one** collective carrying every checked optimizer's flag and, when clipping, its
   norm: :mod:`distscale.collectives`. Every rank issues it, whatever its local values;
3. skips or applies each optimizer's update on that job-wide flag: zero host syncs for fused
   optimizers (``grad_scale``/``found_inf`` stay on the device), one ``tolist()`` per step
   otherwise;
4. applies the pure rule of :mod:`distscale.policy` in ``update()``.

With several optimizers, the scaler remembers which optimizers (and clip norm types) the last
step used; on the next step it checks all of them at the first collective. Gradients that change
afterwards (another backward, ``zero_grad``) are detected through their version counters and
checked again, at the cost of a second collective in that step, never of a wrong decision.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.distributed as dist

from distscale import kernels, pipelining, policy, stats
from distscale._iteration import Batch, OptState
from distscale._scaler_metrics import MetricsMixin
from distscale._scaler_presets import PresetsMixin
from distscale._scaler_state import StateMixin
from distscale._step import StepSync
from distscale.collectives import Packed, ReduceGroup
from distscale.config import HysteresisRefill, MinScaleRule, OnMinScale, ScalerConfig
from distscale.errors import MinScaleError, ScalerUsageError
from distscale.kernels import KERNEL_CHOICES
from distscale.layout import Layout
from distscale.overflow import GradSet

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["GradScaler", "OptState"]

_FIX = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class GradScaler(PresetsMixin, MetricsMixin, StateMixin):
    """Dynamic loss scaler for fp16 training on one process or many.

    A drop-in for ``torch.amp.GradScaler`` and ``ShardedGradScaler``: same arguments, defaults,
    methods and misuse errors; with default arguments on one process the scale and the
    parameters are bitwise identical to torch's. fp16 gradients are accepted.

    Args:
        device: device type of the scale ("cuda" or "cpu"); as in torch, the scale is created on
            the device of the first ``scale()`` output, and "cuda" without CUDA disables scaling.
        init_scale, growth_factor, backoff_factor, growth_interval, enabled: as torch.
        hysteresis: overflows tolerated before a backoff (1: torch's rule). Each overflow spends
            one; all are restored when the scale grows (see ``ScalerConfig.hysteresis_refill``).
        hysteresis_refill: "growth" (refill at each growth; DeepSpeed's default, Megatron) or
            "clean_step" (refill after every step without overflow; DeepSpeed's consecutive_hysteresis).
        min_scale, max_scale: bounds of the scale (None: unbounded; the scale never grows to inf).
        on_min_scale: "clamp", "warn" or "raise" on a min-scale event (see ``min_scale_rule``).
        min_scale_rule, growth_delay, tolerance: the rule variants the presets need (DeepSpeed,
            Megatron, fairseq; see :class:`~distscale.ScalerConfig` and :mod:`distscale.presets`).
        process_group: the ranks that share one skip decision; default: the world group once
            torch.distributed is initialized. Every rank of it must call the scaler's methods in
            the same order (they do in SPMD training).
        mesh, replicate_dims: the job's DeviceMesh (exactly the ranks of ``process_group``, with
            named dims) and the dims over which parameters are copies, e.g. ``("dp",)``; every
            other dim holds different parts of the model (pipeline stages, tensor or expert
            shards). Needed by ``clip_grad_norm_`` where tensors and wrappers do not tell which
            ranks hold copies (plain tensors, DTensors on sub-meshes); an optimizer param group's
            ``"replicate_dims"`` entry overrides it for that group. See :mod:`distscale.layout`.
        check_consistency: every N updates (0: never), the step's collective also carries each
            rank's scale state and ranks that differ raise ``InconsistentStateError`` (on every
            rank, naming them). Costs one host read on those steps.
        kernel: local check backend, "auto" | "torch" | "reference" | "triton" (see
            :mod:`distscale.kernels`); "auto" runs the fused Triton kernel on CUDA grads when
            Triton is installed, torch's multi-tensor op otherwise.
        overflow_diagnostics: on steps that overflow, report which parameters held inf/NaN
            gradients on which rank (see :mod:`distscale.diagnostics`). Costs one host read per
            step with fused optimizers (none extra otherwise) and a gather on overflow steps.
        underflow_every: every N updates (0: never), measure the fraction of gradient elements
            that are zero or would flush to zero in fp16 at the current scale (see
            :mod:`distscale.underflow`): one extra read of the gradients, no extra collective.

    What the scaler did is on the device at no cost: ``metrics()`` (one host read),
    ``metric_tensors()`` and ``step_was_skipped`` (none); see :mod:`distscale.stats`.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        hysteresis_refill: HysteresisRefill = "growth",
        min_scale: float | None = None,
        max_scale: float | None = None,
        on_min_scale: OnMinScale = "clamp",
        min_scale_rule: MinScaleRule = "floor",
        growth_delay: int = 0,
        tolerance: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
        mesh: DeviceMesh | None = None,
        replicate_dims: Sequence[str] | None = None,
        check_consistency: int = 0,
        kernel: str = "auto",
        overflow_diagnostics: bool = False,
        underflow_every: int = 0,
    ) -> None:
        if not isinstance(device, str):
            raise TypeError(f"device must be a device type string such as 'cuda' or 'cpu', got {device!r}.")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}.")
        if (
            isinstance(check_consistency, bool)
            or not isinstance(check_consistency, int)
            or check_consistency < 0
        ):
            raise ValueError(
                f"check_consistency must be an int >= 0 (0 disables), got {check_consistency!r}."
            )
        if not isinstance(overflow_diagnostics, bool):
            raise TypeError(
                f"overflow_diagnostics must be a bool, got {type(overflow_diagnostics).__name__} "
                f"{overflow_diagnostics!r}."
            )
        if isinstance(underflow_every, bool) or not isinstance(underflow_every, int) or underflow_every < 0:
            raise ValueError(
                f"underflow_every must be an int >= 0 (every N updates; 0 disables), got {underflow_every!r}."
            )
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}.")
        self._config = ScalerConfig(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            hysteresis_refill=hysteresis_refill,
            min_scale=min_scale,
            max_scale=max_scale,
            on_min_scale=on_min_scale,
            min_scale_rule=min_scale_rule,
            growth_delay=growth_delay,
            tolerance=tolerance,
        )
        self._device = device
        self._enabled = enabled
        if enabled and device == "cuda" and not torch.cuda.is_available():
            warnings.warn("GradScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        self._reducer = ReduceGroup(process_group)
        self._kernel = kernel
        self._sync = StepSync(
            self._reducer,
            kernel,
            check_consistency,
            layout=Layout(mesh, replicate_dims, process_group),
            underflow_every=underflow_every,
            overflow_diagnostics=overflow_diagnostics,
        )
        # The state lives on the CPU until the first scale() moves it to the loss's device, so
        # load_state_dict() works before the first scale().
        self._state = policy.init_state(self._config, "cpu")
        self._stats = stats.init_stats("cpu")
        self._skipped_host: bool | None = False  # the last step's skip, when already on the host
        self._initialized = False
        self._min_event_host_seen = 0

    # ------------------------------------------------------------------ scaling the loss

    @overload
    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...
    @overload
    def scale(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]: ...
    @overload
    def scale(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...
    @overload
    def scale(self, outputs: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]: ...

    def scale(self, outputs: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor | Iterable[torch.Tensor]:
        """Multiply a tensor (or a nested list/tuple/iterable of tensors) by the scale.

        Returns outputs unchanged when disabled. No host sync; local only.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            self._lazy_init(outputs.device)
            return outputs * self._state.scale.to(device=outputs.device, non_blocking=True)

        def apply(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                self._lazy_init(value.device)
                return value * self._state.scale.to(device=value.device, non_blocking=True)
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                mapped = map(apply, value)
                return type(value)(mapped) if isinstance(value, (list, tuple)) else mapped
            raise ValueError(
                "outputs must be a Tensor or an iterable of Tensors, "
                f"got {type(value).__name__} {value!r} in scale(outputs)."
            )

        return apply(outputs)

    def scale_loss_fn(
        self, loss_fn: Callable[..., torch.Tensor], device: torch.device | str | None = None
    ) -> Callable[..., torch.Tensor]:
        """Wrap ``loss_fn`` for a ``torch.distributed.pipelining`` schedule, which runs backward itself.

        The wrapped function returns the loss *unscaled* (the schedule's ``losses`` are what you
        log) and starts its backward from the scale, so every stage's gradients are exactly those
        of ``scaler.scale(loss).backward()`` (see :mod:`distscale.pipelining`). Build it on every
        rank: it also places the scale on ``device`` (default: the scaler's device type, current
        index), so stages that never compute a loss can unscale and step. No host sync.
        """
        if self._enabled:
            if device is None:
                index = torch.cuda.current_device() if self._device == "cuda" else None
                device = torch.device(self._device, index)
            self._lazy_init(torch.device(device))
        return pipelining.ScaledLossFn(loss_fn, self._state.scale if self._enabled else None)

    def _lazy_init(self, device: torch.device) -> None:
        if not self._initialized:
            self._state = self._state.to(device)
            self._stats = self._stats.to(device)
            self._initialized = True

    def _require_init(self, funcname: str) -> None:
        if not self._initialized:
            raise ScalerUsageError(f"Attempted {funcname} but _scale is None.  " + _FIX)

    # ------------------------------------------------------------------ public step API

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale, in place, and check them for inf/NaN.

        Local only: no collective and no host sync (the job-wide decision is taken later, in
        the step's single collective). Call it once per optimizer per step, after the last
        backward, e.g. before clipping with ``torch.nn.utils.clip_grad_norm_``.
        """
        if not self._enabled:
            return
        self._require_init("unscale_")
        rec = self._sync.iteration.record(optimizer)
        if rec.stage is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        self._sync.check(rec, optimizer, self._state, unscale=True)
        rec.stage = OptState.UNSCALED

    def clip_grad_norm_(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip ``optimizer``'s gradients to a global norm of ``max_norm``; return that norm.

        The norm is that of the *unscaled* gradients over the whole job, every element counted
        once (see :mod:`distscale.sharding`). It travels in the step's single collective, with
        the inf/NaN flags. For fused optimizers the gradients are only read; the clip
        coefficient is folded into ``grad_scale`` at ``step``. Otherwise the gradients are
        unscaled and clipped in place, exactly as ``unscale_`` + ``torch.nn.utils.clip_grad_norm_``.
        No host sync. Returns a 0-dim float32 tensor (inf/NaN when the step will be skipped).
        """
        max_norm = float(max_norm)
        norm_type = float(norm_type)
        if not max_norm >= 0:  # also rejects NaN; inf means no clipping, as torch
            raise ValueError(f"max_norm must be >= 0, got {max_norm!r}.")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}.")
        if not self._enabled:
            return self._clip_unscaled(optimizer, max_norm, norm_type)
        self._require_init("clip_grad_norm_")
        rec = self._sync.iteration.record(optimizer)
        if rec.clipped:
            raise RuntimeError(
                "clip_grad_norm_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        unscale = rec.unscaled or not _fused(optimizer)
        self._sync.check(rec, optimizer, self._state, unscale=unscale, norm_type=norm_type)
        if rec.norm_type != norm_type:
            rec.norm_type, rec.local_norm, rec.total_norm = norm_type, None, None
        self._sync.reduce(self._state)
        assert rec.total_norm is not None
        coef = torch.clamp(max_norm / (rec.total_norm + 1e-6), max=1.0)
        rec.clipped = True
        if rec.unscaled:
            rec.stage = OptState.UNSCALED
            assert rec.grads is not None
            rec.grads.mul_(coef)
        else:
            rec.clip_coef = coef
        return rec.total_norm

    def _clip_unscaled(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float
    ) -> torch.Tensor:
        # Disabled scaler (bf16/fp32 training): a plain shard-aware clip, one collective.
        grads = GradSet(optimizer, self._sync.cache)
        tensors = grads.tensors()
        device = tensors[0].device if tensors else torch.device("cpu")  # a rank may hold no grads
        local = grads.local_norm(norm_type, device, self._kernel, None)
        if self._reducer.world_size == 1:
            self._sync.verify_layout([grads], None)
            total = local
        else:
            flags = [grads.unresolved_flag(device)]
            if math.isinf(norm_type):
                out = self._reducer.reduce(Packed(flags, [], [local]))
                total = out.maxes[0]
            else:
                out = self._reducer.reduce(Packed(flags, [local**norm_type], []))
                total = out.sums[0] ** (1.0 / norm_type)
            self._sync.verify_layout([grads], Batch(torch.stack(out.flags)))
        grads.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless done), then apply ``optimizer.step(*args, **kwargs)`` unless any rank
        found inf/NaN in this optimizer's gradients; return what ``optimizer.step`` returns.

        Takes part in the step's single collective (issued here if not issued yet).
        Host syncs: none for optimizers with ``_step_supports_amp_scaling`` (torch's fused
        Adam/AdamW/SGD/Adagrad): the job-wide ``found_inf`` and ``grad_scale`` (scale folded with
        the clip coefficient) are handed over as device tensors. Otherwise one ``tolist()`` per
        step, shared by all optimizers reduced in the same collective.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._require_init("step")
        rec = self._sync.iteration.record(optimizer)
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if _fused(optimizer):
            self._sync.check(rec, optimizer, self._state, unscale=rec.unscaled)
            self._sync.reduce(self._state)
            user_scale = getattr(optimizer, "grad_scale", None)
            if rec.unscaled:
                grad_scale = user_scale
            else:
                grad_scale = self._state.scale if rec.clip_coef is None else self._state.scale / rec.clip_coef
                if user_scale is not None:
                    grad_scale = grad_scale * user_scale
            optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
            optimizer.found_inf = rec.found_inf  # type: ignore[attr-defined]
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
            rec.stage = OptState.STEPPED
            return retval
        self._sync.check(rec, optimizer, self._state, unscale=True)
        self._sync.apply_pending_clip(rec)
        self._sync.reduce(self._state)
        assert rec.batch is not None
        retval = None
        if not rec.batch.read()[rec.batch_index]:
            retval = optimizer.step(*args, **kwargs)
        rec.stage = OptState.STEPPED
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Apply the scaling rule with the step's job-wide ``found_inf`` (or set ``new_scale``).

        All ranks compute the same new state and metrics (see ``metrics()``), in place on their
        tensors (CUDA-graph safe; one Triton launch on CUDA). ``update(new_scale)`` only sets the
        scale: the rule and the metrics do not advance.
        Host syncs: none, except with ``on_min_scale`` "warn"/"raise" on steps whose flags
        were not already read by ``step`` (one read), and with ``overflow_diagnostics`` (see there).
        """
        if not self._enabled:
            return
        self._require_init("update")
        if new_scale is not None:
            self._set_scale(new_scale)
        else:
            records = [r for r in self._sync.iteration.records.values() if r.checked]
            if not records:
                raise ScalerUsageError("No inf checks were recorded prior to update.")
            self._sync.reduce(self._state)
            found, outcome = self._step_outcome(records)
            self._apply_rule(found, **outcome)
        # Close the step before reporting, so a MinScaleError leaves a usable scaler behind.
        self._sync.finish()
        if new_scale is None:
            self._report_min_scale()

    def _apply_rule(
        self,
        found_inf: torch.Tensor,
        *,
        overflows: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
        underflow: tuple[torch.Tensor, torch.Tensor] | None = None,
        skipped_host: bool | None = None,
    ) -> None:
        # The rule on a job-wide found_inf, in place (also the entry point of the DeepSpeed
        # adapter), then the stats. In place keeps CUDA-graph captures and user references valid.
        if kernels.backend(self._kernel, self._state.scale.device, torch.float32) == "triton":
            # One launch instead of ~40 tiny kernels; bitwise the torch rule below.
            from distscale.kernels import update_triton

            update_triton.update_(
                self._state,
                self._stats,
                found_inf,
                self._config,
                overflows=overflows,
                grad_norm=grad_norm,
                underflow=underflow,
            )
        else:
            new = policy.update(self._state, found_inf, self._config)
            new_stats = stats.update_stats(
                self._stats,
                found_inf,
                new.scale,
                self._config,
                overflows=overflows,
                grad_norm=grad_norm,
                underflow=underflow,
            )
            # One foreach copy writes every value back in place (CUDA-graph captures and user
            # references to the state tensors stay valid).
            torch._foreach_copy_([*self._state, *self._stats], [*new, *new_stats])
        self._skipped_host = skipped_host
        self._sync.num_updates_host += 1

    def _set_scale(self, new_scale: float | torch.Tensor) -> None:
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad:
                raise ValueError(
                    "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                    f"torch.FloatTensor with requires_grad=False, got shape {tuple(new_scale.shape)}, "
                    f"requires_grad={new_scale.requires_grad}."
                )
            self._state.scale.copy_(new_scale.reshape(()))
            return
        if isinstance(new_scale, bool) or not isinstance(new_scale, numbers.Real):
            raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}.")
        if not (math.isfinite(new_scale) and new_scale > 0 and self._config.contains(new_scale)):
            raise ValueError(
                f"new_scale must be finite, > 0 and within [min_scale, max_scale] = "
                f"[{self._config.min_scale}, {self._config.max_scale}], got {new_scale!r}."
            )
        self._state.scale.fill_(float(new_scale))

    def _report_min_scale(self) -> None:
        if self._config.on_min_scale == "clamp" or self._config.min_scale is None:
            return
        count = int(self._state.num_min_scale_events.item())  # host sync, warn/raise only
        if count == self._min_event_host_seen:
            return
        self._min_event_host_seen = count
        if self._config.min_scale_rule == "floor":
            what = f"found the loss scale at min_scale={self._config.min_scale}"
            after = "the scale cannot back off further"
        else:
            what = f"would have brought the loss scale to or below min_scale={self._config.min_scale}"
            after = f"the scale stays at {self._state.scale.item()}"
        message = (
            f"An overflow {what} ({count} time(s) so far); the step was skipped and {after}. "
            "The loss is probably exploding: lower the learning rate, clip gradients or raise the batch size."
        )
        if self._config.on_min_scale == "raise":
            raise MinScaleError(message + " HINT: lower min_scale, or use on_min_scale='clamp'.")
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ getters and setters

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled). Host sync."""
        return float(self._state.scale.item()) if self._enabled else 1.0

    def _get_growth_tracker(self) -> int:
        return int(self._state.growth_tracker.item()) if self._enabled else 0

    def is_enabled(self) -> bool:
        """Whether scaling is enabled."""
        return self._enabled

    @property
    def config(self) -> ScalerConfig:
        """The scaling rule in force (a frozen dataclass)."""
        return self._config

    def get_growth_factor(self) -> float:
        return self._config.growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        self._config = replace(self._config, growth_factor=new_factor)

    def get_backoff_factor(self) -> float:
        return self._config.backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._config = replace(self._config, backoff_factor=new_factor)

    def get_growth_interval(self) -> int:
        return self._config.growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._config = replace(self._config, growth_interval=new_interval)
