"""GradScaler: torch.amp.GradScaler's API, one skip decision and one collective per step.

The whole contract of the class is here: construction and presets, scaling the loss, the step
API (each public method is torch's stage checks plus one call into :mod:`distscale.engine`, which
owns every per-optimizer transition), the rule and the metrics applied in ``update()``,
persistence and pickling. Per optimizer step (between two ``update()`` calls):

1. each optimizer's *local* gradients are checked for inf/NaN (and unscaled in place unless the
   optimizer is fused and takes ``grad_scale``): :mod:`distscale.overflow`, no communication;
2. the first call that needs a job-wide answer (``step``, ``clip_grad_norm_``, ``update``) issues
   **one** collective carrying every checked optimizer's flag and, when clipping, its norm:
   :mod:`distscale.collectives`. Every rank issues it, whatever its local values;
3. each optimizer's update is skipped or applied on that job-wide flag: zero host syncs for fused
   optimizers (``grad_scale``/``found_inf`` stay on the device), one ``tolist()`` per step
   otherwise;
4. ``update()`` applies the pure rule of :mod:`distscale.policy` and advances the metrics of
   :mod:`distscale.stats` on the step's outcome.
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.distributed as dist
from typing_extensions import Self

from distscale import checkpoint, fields, kernels, pipelining, policy, presets, rules, stats
from distscale.collectives import ReduceGroup
from distscale.config import HysteresisRefill, MinScaleRule, OnFault, OnMinScale, Rule, ScalerConfig
from distscale.diagnostics import FaultReport, OverflowReport
from distscale.engine import OptState, StepEngine, takes_grad_scale
from distscale.errors import FaultError, MinScaleError, ScalerUsageError
from distscale.kernels import KERNEL_CHOICES
from distscale.layout import Layout
from distscale.overflow import group_by_device_and_dtype
from distscale.stats import StepOutcome

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["GradScaler", "OptState"]

_FIX = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."


class GradScaler:
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
        rule, amax_margin: "torch" grows the scale blindly after ``growth_interval`` clean steps;
            "amax" sets it from the largest scaled gradient the check measures (in its pass with
            Triton, one more read otherwise), carried in the step's collective: the first clean
            step picks the scale that leaves ``amax_margin`` of fp16 headroom, and the scale grows
            only when every clean step of the growth interval left that headroom, as far as the
            interval's peak allows (see :class:`~distscale.ScalerConfig`).
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
        skip_grad_norm_above, skip_grad_norm_sigma, skip_grad_norm_ratio, skip_loss_above,
        skip_loss_sigma, skip_loss_ratio, spike_window, spike_warmup: skip rules beyond inf/NaN
            (all off by default): skip steps whose job-wide gradient norm or loss is above a
            threshold, or spikes above the statistics of the last ``spike_window`` applied steps.
            Decided on the device from the step's single collective, the same on every rank; a
            rule skip holds the scale (no backoff). The loss is what ``scale()`` is given (a 0-dim
            tensor). See :mod:`distscale.rules`. With a norm rule every step measures the norm
            (the clip's, or the 2-norm) in its collective; with rules on, ``update()`` runs the
            rule as torch ops (no sync) instead of one Triton launch.
        on_fault, fault_repeats: fault attribution: non-finite events a backoff cannot cure (one
            rank alone non-finite ``fault_repeats`` times in a row, non-finite values at the scale's
            floor, a non-finite loss from finite gradients) are suspected faults: skipped, the
            scale held, the rank, host, device and parameters named, then "warn", "raise"
            (``FaultError`` on every rank) or "skip". One host read per step with fused optimizers
            (none extra otherwise) and a gather on suspected-fault steps only.

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
        rule: Rule = "torch",
        amax_margin: float = 2.0**3,
        process_group: dist.ProcessGroup | None = None,
        mesh: DeviceMesh | None = None,
        replicate_dims: Sequence[str] | None = None,
        check_consistency: int = 0,
        kernel: str = "auto",
        overflow_diagnostics: bool = False,
        underflow_every: int = 0,
        skip_grad_norm_above: float | None = None,
        skip_grad_norm_sigma: float | None = None,
        skip_grad_norm_ratio: float | None = None,
        skip_loss_above: float | None = None,
        skip_loss_sigma: float | None = None,
        skip_loss_ratio: float | None = None,
        spike_window: int = 100,
        spike_warmup: int = 100,
        on_fault: OnFault | None = None,
        fault_repeats: int = 3,
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
            rule=rule,
            amax_margin=amax_margin,
            skip_grad_norm_above=skip_grad_norm_above,
            skip_grad_norm_sigma=skip_grad_norm_sigma,
            skip_grad_norm_ratio=skip_grad_norm_ratio,
            skip_loss_above=skip_loss_above,
            skip_loss_sigma=skip_loss_sigma,
            skip_loss_ratio=skip_loss_ratio,
            spike_window=spike_window,
            spike_warmup=spike_warmup,
            on_fault=on_fault,
            fault_repeats=fault_repeats,
        )
        self._device = device
        self._enabled = enabled
        if enabled and device == "cuda" and not torch.cuda.is_available():
            warnings.warn("GradScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        self._reducer = ReduceGroup(process_group)
        self._kernel = kernel
        self._engine = StepEngine(
            self._reducer,
            kernel,
            layout=Layout(mesh, replicate_dims, process_group),
            check_every=check_consistency,
            underflow_every=underflow_every,
            overflow_diagnostics=overflow_diagnostics,
            measure_amax=self._config.rule == "amax",
        )
        # The state lives on the CPU until the first scale() moves it to the loss's device, so
        # load_state_dict() works before the first scale().
        self._state = policy.init_state(self._config, "cpu")
        self._stats = stats.init_stats("cpu")
        self._rules = rules.init_state(self._config, "cpu")
        self._engine.rule_state = self._rules
        self._engine.rule_config = self._config if self._config.decides_beyond_overflow else None
        self._skipped_host: bool | None = False  # the last step's skip, when already on the host
        self._initialized = False
        self._init_tracker_override: int | None = None  # torch's _init_growth_tracker, when assigned
        self._min_event_host_seen = 0

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_deepspeed_config(cls, config: Mapping[str, Any], device: str = "cuda", **overrides: Any) -> Self:
        """A scaler whose scale follows DeepSpeed's fp16 loss scaling for ``config``.

        ``config``: a DeepSpeed config dict, whole or its ``"fp16"`` section; semantics in
        :func:`distscale.presets.deepspeed`. Raises at the minimum scale as ZeRO does
        (``on_min_scale="clamp"`` overrides). ``overrides``: any GradScaler keyword argument.
        """
        return cls(device, **{**presets.deepspeed(config), **overrides})

    @classmethod
    def from_megatron(cls, device: str = "cuda", **kwargs: Any) -> Self:
        """A scaler following Megatron-core's ``DynamicGradScaler`` (or ``ConstantGradScaler``).

        ``kwargs``: Megatron's names (``loss_scale``, ``initial_loss_scale``, ``min_loss_scale``,
        ``loss_scale_window``, ``hysteresis``, ``growth_factor``, ``backoff_factor``; Megatron's
        defaults) and any other GradScaler keyword argument. See :func:`distscale.presets.megatron`.
        """
        return cls._from_preset(presets.megatron, device, kwargs)

    @classmethod
    def from_fairseq(cls, device: str = "cuda", **kwargs: Any) -> Self:
        """A scaler following fairseq's ``DynamicLossScaler`` with fairseq-train's defaults.

        ``kwargs``: fairseq's names (``init_scale``, ``scale_factor``, ``scale_window``,
        ``tolerance``, ``threshold``, ``min_loss_scale``, ``data_parallel_size``, ``update_freq``)
        and any other GradScaler keyword argument. Without ``scale_window`` and
        ``data_parallel_size``, the data-parallel size is the world size of ``process_group`` (or of
        the default group) when torch.distributed is initialized, else 1: pass it under model
        parallelism. See :func:`distscale.presets.fairseq`.
        """
        if "scale_window" not in kwargs and "data_parallel_size" not in kwargs:
            group = kwargs.get("process_group")
            initialized = dist.is_available() and dist.is_initialized()
            kwargs = {**kwargs, "data_parallel_size": dist.get_world_size(group) if initialized else 1}
        return cls._from_preset(presets.fairseq, device, kwargs)

    @classmethod
    def _from_preset(cls, build: Any, device: str, kwargs: dict[str, Any]) -> Self:
        names = inspect.signature(build).parameters
        settings = build(**{k: v for k, v in kwargs.items() if k in names})
        return cls(device, **{**settings, **{k: v for k, v in kwargs.items() if k not in names}})

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
            if self._watches_loss and outputs.numel() == 1:
                self._engine.note_loss(outputs)
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
                cuda = self._device == "cuda"
                device = (
                    torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(self._device)
                )
            self._lazy_init(torch.device(device))
        observe = self._engine.note_loss if self._enabled and self._watches_loss else None
        return pipelining.ScaledLossFn(loss_fn, self._state.scale if self._enabled else None, observe)

    @property
    def _watches_loss(self) -> bool:
        # The loss rules and fault attribution read the losses given to scale().
        return self._config.loss_rules or self._config.on_fault is not None

    def _lazy_init(self, device: torch.device) -> None:
        if not self._initialized:
            self._state = self._state.to(device)
            self._stats = self._stats.to(device)
            self._rules = self._engine.rule_state = self._rules.to(device)
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
        stage = self._engine.record(optimizer).stage
        if stage is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        self._engine.unscale_(optimizer, self._state)

    def clip_grad_norm_(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip ``optimizer``'s gradients to a global norm of ``max_norm``; return that norm.

        The norm is that of the *unscaled* gradients over the whole job, every element counted
        once (see :mod:`distscale.sharding`; where that is unknown, ``ReplicationError`` on every
        rank). It travels in the step's single collective, with the inf/NaN flags. For fused
        optimizers the gradients are only read; the clip coefficient is folded into ``grad_scale``
        at ``step``. Otherwise the gradients are unscaled and clipped in place, exactly as
        ``unscale_`` + ``torch.nn.utils.clip_grad_norm_``. No host sync, except once on the first
        clip after a parameter list changed (the layout check). Returns a 0-dim float32 tensor
        (inf/NaN when the step will be skipped).
        """
        max_norm = float(max_norm)
        norm_type = float(norm_type)
        if not max_norm >= 0:  # also rejects NaN; inf means no clipping, as torch
            raise ValueError(f"max_norm must be >= 0, got {max_norm!r}.")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}.")
        if not self._enabled:
            return self._engine.clip_unscaled(optimizer, max_norm, norm_type)
        self._require_init("clip_grad_norm_")
        rec = self._engine.record(optimizer)
        if rec.clipped:
            raise RuntimeError(
                "clip_grad_norm_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        return self._engine.clip_grad_norm_(optimizer, self._state, max_norm, norm_type)

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
        if self._engine.record(optimizer).stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if takes_grad_scale(optimizer) and _accepts_grad_scaler(optimizer.step):
            # torch's legacy protocol: the optimizer decides through _check_inf_per_device.
            warnings.warn(
                f"{type(optimizer).__name__}.step takes grad_scaler=, a protocol torch deprecates: the "
                "scaler passes itself and the optimizer must ask it for the decision. Optimizers should "
                "read the grad_scale and found_inf tensors the scaler sets on them instead.",
                FutureWarning,
                stacklevel=2,
            )
            return self._engine.legacy_step(optimizer, self, args, kwargs)
        return self._engine.step(optimizer, self._state, args, kwargs)

    def update(
        self, new_scale: float | torch.Tensor | None = None, *, found_inf: bool | torch.Tensor | None = None
    ) -> None:
        """Apply the scaling rule with the step's job-wide ``found_inf`` (or set ``new_scale``).

        All ranks compute the same new state and metrics (see ``metrics()``), in place on their
        tensors (CUDA-graph safe; one Triton launch on CUDA). ``update(new_scale)`` only sets the
        scale (and empties the "amax" rule's window): the rule and the metrics do not advance. ``found_inf``: a job-wide overflow flag
        decided elsewhere (a DeepSpeed engine's, see :mod:`distscale.deepspeed_engine`), instead of
        this step's checks; every rank must pass the same value.
        Host syncs: none, except with ``on_min_scale`` "warn"/"raise" on steps whose flags
        were not already read by ``step`` (one read), and with ``overflow_diagnostics`` (see there).
        """
        if not self._enabled:
            return
        if found_inf is None:
            self._require_init("update")
        else:  # a step decided elsewhere needs no scale() first: the state stays where it is
            self._lazy_init(self._state.scale.device)
        if new_scale is not None and found_inf is not None:
            raise ValueError("update() takes new_scale or found_inf, not both.")
        if new_scale is not None:
            self._set_scale(new_scale)
            self._engine.end()
            return
        if found_inf is not None:
            self._engine.end()
            self._advance(_external_outcome(found_inf, self._state.scale.device))
        else:
            if not self._engine.checked_any:
                raise ScalerUsageError("No inf checks were recorded prior to update.")
            self._advance(self._engine.finish(self._state))
        # The step is closed before reporting, so a MinScaleError leaves a usable scaler behind.
        self._report_min_scale()
        self._report_fault()

    def _advance(self, outcome: StepOutcome) -> None:
        # The rule on a job-wide outcome, then the metrics, in place: CUDA-graph captures and user
        # references to the state tensors stay valid.
        if outcome.decision is not None:  # skip rules: the torch rule with held steps
            new = policy.update(self._state, outcome.found_inf, self._config, outcome.amax, outcome.held)
            new_stats = stats.update_stats(self._stats, outcome, self._state, new, self._config)
            new_rules = rules.advance(self._rules, outcome.decision)
            torch._foreach_copy_([*self._state, *self._stats, *self._rules], [*new, *new_stats, *new_rules])
        elif kernels.backend(self._kernel, self._state.scale.device, torch.float32) == "triton":
            # One launch instead of ~40 tiny kernels; bitwise the torch rule below.
            from distscale.kernels import update_triton

            update_triton.update_(
                self._state,
                self._stats,
                outcome.found_inf,
                self._config,
                overflows=outcome.overflows,
                grad_norm=outcome.grad_norm,
                underflow=outcome.underflow,
                amax=outcome.amax,
            )
        else:
            new = policy.update(self._state, outcome.found_inf, self._config, outcome.amax)
            new_stats = stats.update_stats(self._stats, outcome, self._state, new, self._config)
            # One foreach copy writes every value back in place.
            torch._foreach_copy_([*self._state, *self._stats], [*new, *new_stats])
        self._skipped_host = outcome.skipped_host
        self._engine.num_updates_host += 1

    def _set_scale(self, new_scale: float | torch.Tensor) -> None:
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad:
                raise ValueError(
                    "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                    f"torch.FloatTensor with requires_grad=False, got shape {tuple(new_scale.shape)}, "
                    f"requires_grad={new_scale.requires_grad}."
                )
            self._state.scale.copy_(new_scale.reshape(()))
            self._state.amax_window.zero_()  # scaled magnitudes: they described the old scale
            return
        if isinstance(new_scale, bool) or not isinstance(new_scale, numbers.Real):
            raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}.")
        if not (math.isfinite(new_scale) and new_scale > 0 and self._config.contains(new_scale)):
            raise ValueError(
                f"new_scale must be finite, > 0 and within [min_scale, max_scale] = "
                f"[{self._config.min_scale}, {self._config.max_scale}], got {new_scale!r}."
            )
        self._state.scale.fill_(float(new_scale))
        self._state.amax_window.zero_()

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

    def _report_fault(self) -> None:
        report = self._engine.step_fault_report
        on_fault = self._config.on_fault
        if report is None or on_fault is None or on_fault == "skip":
            return
        message = report.format()
        if on_fault == "raise":
            raise FaultError(
                message + "\nHINT: drain that host and restart from the last checkpoint, or use "
                "on_fault='warn' to train on.",
                report,
            )
        if self._reducer.rank == 0:  # the report is the same on every rank: warn once
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ what the scaler did

    @property
    def step_was_skipped(self) -> torch.Tensor:
        """Whether the step closed by the last ``update()`` was skipped: a 0-dim bool tensor on the
        scale's device, updated in place by each ``update()`` (clone it to keep a value).

        No host sync: use it in device-side logic (see :func:`distscale.skip.ema_update_`).
        """
        return self._stats.step_was_skipped

    def last_step_skipped(self) -> bool:
        """``step_was_skipped`` as a Python bool (False when disabled).

        Host sync: none when ``step`` already read the flags (optimizers that are not fused);
        one ``item()`` otherwise.
        """
        if not self._enabled:
            return False
        if self._skipped_host is None:
            self._skipped_host = bool(self._stats.step_was_skipped.item())  # host sync
        return self._skipped_host

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """The metrics of ``metrics()`` as 0-dim device tensors (copies). No host sync."""
        if not self._enabled:
            return {}
        st = self._state
        named = {
            "scale": st.scale,
            "growth_tracker": st.growth_tracker,
            "hysteresis_tracker": st.hysteresis_tracker,
            "steps": st.num_updates,
            "skipped_steps": st.num_skipped,
            "min_scale_events": st.num_min_scale_events,
            **self._stats._asdict(),
        }
        r = self._rules
        # Without rules the only reason is an overflow: derived here, nothing spent per step.
        deciding = self._engine.rule_config is not None
        named.update(
            norm_spikes=r.norm_spikes,
            loss_spikes=r.loss_spikes,
            suspected_faults=r.suspected_faults,
            skip_reason=r.skip_reason if deciding else self._stats.step_was_skipped.long(),
            fault_rank=r.fault_rank,
            observed_loss=r.loss,
        )
        return {k: v.clone() for k, v in named.items()}

    def metrics(self) -> dict[str, float | int | bool]:
        """What the scaler did, as Python numbers. One host sync (one ``tolist()``); read it on the
        steps you log, on any rank (every rank holds the same values). Empty when disabled.

        Keys: ``scale``, ``growth_tracker``, ``hysteresis_tracker``, ``steps`` (updates applied),
        ``skipped_steps``, ``min_scale_events`` and the counters of
        :class:`~distscale.stats.ScalerStats` (``overflows``, ``consecutive_overflows``,
        ``max_consecutive_overflows``, ``steps_since_overflow``, ``steps_at_min_scale``,
        ``step_was_skipped``, ``grad_norm``, ``zero_fraction``, ``underflow_fraction``, ``amax``,
        ``headroom_log2``, ``scale_change``; NaN: not measured) and the skip rules' counters
        (``norm_spikes``, ``loss_spikes``, ``suspected_faults``; ``skip_reason``, an index into
        :data:`distscale.rules.SKIP_REASONS`; ``fault_rank``; ``observed_loss``, the job-wide loss the
        rules saw: the mean of the losses given to ``scale()``, with rules on). ``skipped_steps`` counts overflows; each other reason has its counter.
        """
        tensors = self.metric_tensors()
        if not tensors:
            return {}
        return fields.to_host(tensors)  # host sync

    @property
    def last_skip_reason(self) -> str | None:
        """Why the step closed by the last ``update()`` was skipped: "overflow", "norm_spike",
        "loss_spike" or "fault"; None when it was applied (or disabled). Host sync: one read."""
        if not self._enabled:
            return None
        code = int(self.metric_tensors()["skip_reason"].item())  # host sync
        return None if code == 0 else rules.SKIP_REASONS[code]

    @property
    def last_fault_report(self) -> FaultReport | None:
        """With ``on_fault``: the last suspected fault (rank, host, device, parameters), the same
        on every rank; None before any."""
        return self._engine.last_fault_report

    @property
    def last_overflow_report(self) -> OverflowReport | None:
        """With ``overflow_diagnostics``: the findings of the last overflow step, on rank 0 of the
        scaler's group (None on other ranks, and before any overflow)."""
        return self._engine.last_overflow_report

    def set_parameter_names(self, named: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name parameters in overflow reports and errors: a module (its ``named_parameters()``) or
        ``(name, param)`` pairs. Without it, reports name optimizer positions. Local only."""
        pairs = named.named_parameters() if isinstance(named, torch.nn.Module) else named
        self._engine.parameter_names = {id(p): name for name, p in pairs}

    def register_model(
        self, model: torch.nn.Module, *, replicated_over: torch.distributed.ProcessGroup | None = None
    ) -> None:
        """Learn ``model``'s parameter names (``set_parameter_names``) and what its DDP and FSDP1
        wrappers tell about which ranks hold copies of which parameters (their process groups,
        which their tensors do not carry), for ``clip_grad_norm_`` (see :mod:`distscale.layout`).

        ``replicated_over``: a process group over which every parameter of ``model`` is a copy,
        for a model whose DDP wrapper you cannot pass (a framework keeps it); wrappers inside
        ``model`` still win for their parameters.

        Call it on every rank after wrapping, before the first step. Local only: no collective,
        no host sync. Raises ValueError if a wrapper spans ranks outside the scaler's group.
        """
        self.set_parameter_names(model)
        self._engine.classifications.layout.register_model(
            model, self._reducer.global_ranks, replicated_over=replicated_over
        )

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain Python values (see :mod:`distscale.checkpoint`).

        Empty when disabled, as torch. One host sync. Call it after ``update()``. The scaler is a
        ``torch.distributed.checkpoint`` Stateful: every rank holds the same state.
        """
        if not self._enabled:
            return {}
        plain = fields.to_host(
            {**self._state._asdict(), **self._stats._asdict(), **self._rules._asdict()}
        )  # host sync
        return checkpoint.build(
            self._config,
            {name: plain[name] for name in policy.ScaleState._fields},
            {name: plain[name] for name in stats.ScalerStats._fields},
            {name: plain[name] for name in rules.RuleState._fields},
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from ``state_dict()`` (this format or torch.amp.GradScaler's).

        Validates everything first: a bad state raises and leaves the scaler unchanged. Works
        before the first ``scale()``. No-op when disabled, as torch.
        """
        if not self._enabled:
            return
        config, values, stat_values, rule_values = checkpoint.validate(state_dict, self._config)
        self._config = config
        self._engine.measure_amax = config.rule == "amax"
        self._engine.rule_config = config if config.decides_beyond_overflow else None
        # The histories' length is the loaded spike_window.
        self._rules = self._engine.rule_state = rules.init_state(config, self._state.scale.device)
        for name, tensor in zip(rules.RuleState._fields, self._rules, strict=True):
            tensor.copy_(torch.tensor(rule_values[name], dtype=tensor.dtype))
        for name, tensor in zip(policy.ScaleState._fields, self._state, strict=True):
            tensor.fill_(values[name])
        for name, tensor in zip(stats.ScalerStats._fields, self._stats, strict=True):
            tensor.fill_(stat_values[name])
        self._skipped_host = bool(stat_values["step_was_skipped"])
        self._init_tracker_override = int(values["growth_tracker"])  # torch's _init_growth_tracker
        self._engine.num_updates_host = values["num_updates"]
        self._min_event_host_seen = values["num_min_scale_events"]

    def __getstate__(self) -> dict[str, Any]:
        if self._engine.in_progress:
            raise ScalerUsageError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = self.__dict__.copy()
        state["_state"] = self._state.to("cpu")
        state["_stats"] = self._stats.to("cpu")
        state["_rules"] = self._rules.to("cpu")
        state["_initialized"] = False
        # Process groups do not pickle: an unpickled scaler reduces over the default group.
        state["_reducer"] = ReduceGroup(None)
        state["_engine"] = self._engine.fresh(state["_reducer"])
        state["_engine"].rule_state = state["_rules"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ torch's internals
    #
    # Code written against torch.amp.GradScaler reaches into these (accelerate's FSDP2 load_state,
    # optimizers of the legacy ``grad_scaler=`` protocol, tests). Each is backed by distscale's
    # state and behaves as torch's: the same types, devices and ``None`` before the first scale().

    @property
    def _scale(self) -> torch.Tensor | None:
        """The live 0-dim float32 scale tensor (None before the first ``scale()`` or disabled)."""
        return self._state.scale if self._enabled and self._initialized else None

    @_scale.setter
    def _scale(self, value: torch.Tensor) -> None:
        self._assign_state("_scale", value, self._state.scale)

    @property
    def _growth_tracker(self) -> torch.Tensor | None:
        """The live 0-dim int32 growth tracker (None before the first ``scale()`` or disabled)."""
        return self._state.growth_tracker if self._enabled and self._initialized else None

    @_growth_tracker.setter
    def _growth_tracker(self, value: torch.Tensor) -> None:
        self._assign_state("_growth_tracker", value, self._state.growth_tracker)

    def _assign_state(self, name: str, value: object, target: torch.Tensor) -> None:
        # torch's attribute is rebound; here the value is copied into the state it stands for.
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"{name} must be a 1-element tensor, got {type(value).__name__} {value!r}.")
        self._lazy_init(value.device)
        target.copy_(value.reshape(()))

    @property
    def _init_scale(self) -> float:
        return self._config.init_scale

    @property
    def _init_growth_tracker(self) -> int:
        """The growth tracker's value at the first ``scale()`` (or as last loaded), as torch's."""
        if self._init_tracker_override is not None:
            return self._init_tracker_override
        return -self._config.growth_delay

    @_init_growth_tracker.setter
    def _init_growth_tracker(self, value: int) -> None:
        # As torch: it seeds the tracker the first scale() creates; a tracker in use is left alone.
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"_init_growth_tracker must be an int, got {type(value).__name__} {value!r}.")
        self._init_tracker_override = int(value)
        if not self._initialized:
            self._state.growth_tracker.fill_(int(value))

    @property
    def _growth_factor(self) -> float:
        return self._config.growth_factor

    @property
    def _backoff_factor(self) -> float:
        return self._config.backoff_factor

    @property
    def _growth_interval(self) -> int:
        return self._config.growth_interval

    def _lazy_init_scale_growth_tracker(self, dev: torch.device | str) -> None:
        """Place the state on ``dev`` now, as the first ``scale()`` would (a loaded state is kept).
        Raises as torch does when it is already placed."""
        if self._initialized:
            raise ScalerUsageError("_growth_tracker initialized before _scale")
        self._lazy_init(torch.device(dev))

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_init(funcname)
        return self._state.scale, self._state.growth_tracker

    def _get_scale_async(self) -> torch.Tensor | None:
        """The scale tensor, no sync (None before the first ``scale()``)."""
        return self._scale

    @property
    def _per_optimizer_states(self) -> dict[int, dict[str, Any]]:
        """torch's per-optimizer records of this step, keyed by ``id(optimizer)``: ``"stage"`` (an
        ``OptState``) and ``"found_inf_per_device"`` (this rank's flag after a check, the
        job-wide one once the step's collective ran). A snapshot, rebuilt on each access: changing
        it changes nothing."""
        states: dict[int, dict[str, Any]] = collections.defaultdict(_ready_state)
        for key, rec in self._engine.step_records().items():
            optimizer = rec.optimizer()
            if optimizer is not None:
                states[key] = {
                    "stage": rec.stage,
                    "found_inf_per_device": self._engine.found_inf_per_device(optimizer),
                }
        return states

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        return self._engine.found_inf_per_device(optimizer)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """Check ``optimizer``'s grads without unscaling them and take the step's job-wide
        decision: every rank of the group must call it (it joins the step's single collective).
        Returns ``{device: found_inf}``, the same on every rank."""
        self._require_init("_check_inf_per_device")
        found_inf = self._engine.check_inf(optimizer, self._state)
        return {found_inf.device: found_inf}

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        """torch's local helper: multiply ``optimizer``'s grads by ``inv_scale`` in place and check
        them for inf/NaN; return ``{device: flag}``, a copy of ``found_inf`` per grad device set to
        1 where one was found (``found_inf`` itself is left as it is, as torch leaves it). This
        rank only: no collective, no stage change (the step's decision still comes from
        ``unscale_``/``step``)."""
        values: list[torch.Tensor] = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if not allow_fp16 and param.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if param.grad.is_sparse:
                        # Duplicate indices of scaled fp16 values may overflow only once summed.
                        if param.grad.dtype == torch.float16:
                            param.grad = param.grad.coalesce()
                        values.append(param.grad._values())
                    else:
                        values.append(param.grad)
            found_per_device: dict[torch.device, torch.Tensor] = {}
            for (device, dtype), grads in group_by_device_and_dtype(values).items():
                if device not in found_per_device:
                    found_per_device[device] = found_inf.to(device, copy=True)
                backend = kernels.backend(self._kernel, device, dtype)
                kernels.check_(grads, found_per_device[device], inv_scale.to(device), None, backend=backend)
        return found_per_device

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
        self._engine.rule_config = self._config if self._config.decides_beyond_overflow else None

    def get_backoff_factor(self) -> float:
        return self._config.backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._config = replace(self._config, backoff_factor=new_factor)
        self._engine.rule_config = self._config if self._config.decides_beyond_overflow else None

    def get_growth_interval(self) -> int:
        return self._config.growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._config = replace(self._config, growth_interval=new_interval)
        self._engine.rule_config = self._config if self._config.decides_beyond_overflow else None


@functools.cache
def _takes_grad_scaler_kwarg(step: Callable[..., Any]) -> bool:
    return "grad_scaler" in inspect.signature(step).parameters


def _accepts_grad_scaler(step: Callable[..., Any]) -> bool:
    """Whether an optimizer's ``step`` takes torch's legacy ``grad_scaler=`` keyword (cached per
    function: the signature is read once, not every step)."""
    return _takes_grad_scaler_kwarg(getattr(step, "__func__", step))


def _ready_state() -> dict[str, Any]:
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def _external_outcome(found_inf: bool | torch.Tensor, device: torch.device) -> StepOutcome:
    """A step decided elsewhere (``update(found_inf=...)``): its flag, on the state's device."""
    if isinstance(found_inf, bool):
        return StepOutcome(torch.tensor(float(found_inf), device=device), skipped_host=found_inf)
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise TypeError(
            "found_inf must be a bool or a 1-element tensor (> 0: the step overflowed), got "
            f"{type(found_inf).__name__} {found_inf!r}."
        )
    return StepOutcome(found_inf.reshape(()).to(device=device, dtype=torch.float32))
