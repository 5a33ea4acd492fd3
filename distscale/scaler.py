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
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, overload

import torch
import torch.distributed as dist

from distscale import checkpoint, policy
from distscale._iteration import Batch, Iteration, OptRecord, OptState
from distscale.collectives import Packed, ReduceGroup
from distscale.config import OnMinScale, ScalerConfig
from distscale.errors import InconsistentStateError, MinScaleError, ScalerUsageError
from distscale.kernels import KERNEL_CHOICES
from distscale.overflow import GradSet

__all__ = ["GradScaler", "OptState"]

_FIX = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


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
        min_scale, max_scale: bounds of the scale (None: unbounded; the scale never grows to inf).
        on_min_scale: "clamp", "warn" or "raise" when an overflow finds the scale at min_scale.
        process_group: the ranks that share one skip decision; default: the world group once
            torch.distributed is initialized. Every rank of it must call the scaler's methods in
            the same order (they do in SPMD training).
        check_consistency: every N updates (0: never), the step's collective also carries each
            rank's scale state and ranks that differ raise ``InconsistentStateError`` (on every
            rank, naming them). Costs one host read on those steps.
        kernel: local check backend, "auto" | "torch" | "reference" (see :mod:`distscale.kernels`).
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
        min_scale: float | None = None,
        max_scale: float | None = None,
        on_min_scale: OnMinScale = "clamp",
        process_group: dist.ProcessGroup | None = None,
        check_consistency: int = 0,
        kernel: str = "auto",
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
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}.")
        self._config = ScalerConfig(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
            on_min_scale=on_min_scale,
        )
        self._device = device
        self._enabled = enabled
        if enabled and device == "cuda" and not torch.cuda.is_available():
            warnings.warn("GradScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        self._reducer = ReduceGroup(process_group)
        self._check_every = check_consistency
        self._kernel = kernel
        # The state lives on the CPU until the first scale() moves it to the loss's device, so
        # load_state_dict() works before the first scale().
        self._state = policy.init_state(self._config, "cpu")
        self._initialized = False
        self._iteration = Iteration()
        self._plan: list[tuple[weakref.ref[torch.optim.Optimizer], float | None]] = []
        self._num_updates_host = 0  # host mirror of num_updates, for the consistency schedule
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

    def _lazy_init(self, device: torch.device) -> None:
        if not self._initialized:
            self._state = self._state.to(device)
            self._initialized = True

    def _require_init(self, funcname: str) -> None:
        if not self._initialized:
            raise ScalerUsageError(f"Attempted {funcname} but _scale is None.  " + _FIX)

    def _inv_scale(self) -> torch.Tensor:
        # float64 reciprocal, as torch: float32 division is imprecise under some compile options.
        return self._state.scale.double().reciprocal().float()

    # ------------------------------------------------------------------ local checks

    def _check(self, rec: OptRecord, optimizer: torch.optim.Optimizer, unscale: bool) -> None:
        """Make sure ``rec`` holds a local flag for the current grads, unscaled if asked."""
        rank = self._reducer.rank
        if rec.checked and rec.unscaled:
            # Unscaled grads are the user's to modify (clipping, say): never check them again.
            return
        if rec.checked and rec.grads is not None and rec.grads.unchanged_since(optimizer, rank):
            if unscale and not rec.unscaled:
                scratch = torch.zeros_like(rec.local_found_inf)
                rec.grads.check_(scratch, self._inv_scale(), self._kernel, check=False)
                rec.unscaled = True
                self._apply_pending_clip(rec)
            return
        rec.invalidate()
        rec.grads = GradSet(optimizer, rank)
        rec.local_found_inf = torch.zeros((), dtype=torch.float32, device=self._state.scale.device)
        rec.grads.check_(rec.local_found_inf, self._inv_scale() if unscale else None, self._kernel)
        rec.unscaled = unscale

    def _apply_pending_clip(self, rec: OptRecord) -> None:
        # A fused optimizer's clip coefficient was waiting to be folded into grad_scale, but the
        # grads were unscaled in place meanwhile: apply it in place instead.
        if rec.clip_coef is not None and rec.grads is not None:
            _mul_(rec.grads.tensors(), rec.clip_coef)
            rec.grads.refresh_versions()
            rec.clip_coef = None

    # ------------------------------------------------------------------ the one collective

    def _reduce(self) -> None:
        """Reduce every checked-but-unreduced record with one collective (none if all done)."""
        it = self._iteration
        if it.num_collectives == 0 and self._reducer.world_size > 1:
            self._precheck_planned()
        pending = [r for r in it.records.values() if r.checked and not r.reduced]
        if not pending:
            return
        device = self._state.scale.device
        world = self._reducer.world_size
        inv_scale = self._inv_scale()
        sums: list[torch.Tensor] = []
        maxes: list[torch.Tensor] = []
        for rec in pending:
            if rec.norm_type is not None and rec.local_norm is None:
                assert rec.grads is not None
                rec.local_norm = rec.grads.local_norm(
                    rec.norm_type, device, self._kernel, None if rec.unscaled else inv_scale
                )
            if rec.norm_type is not None and world > 1:
                if math.isinf(rec.norm_type):
                    maxes.append(rec.local_norm)
                else:
                    sums.append(rec.local_norm**rec.norm_type)
        check = (
            self._check_every > 0
            and it.num_collectives == 0
            and self._num_updates_host % self._check_every == 0
        )
        packed = Packed(
            flags=[r.local_found_inf for r in pending],  # type: ignore[misc]
            sums=sums,
            maxes=maxes,
            slots=self._fingerprint() if check and world > 1 else None,
        )
        out = self._reducer.reduce(packed, torch.float64 if packed.slots is not None else torch.float32)
        it.num_collectives += 1
        batch = Batch(torch.stack(out.flags))
        sums_iter, maxes_iter = iter(out.sums), iter(out.maxes)
        for index, (rec, flag) in enumerate(zip(pending, out.flags, strict=True)):
            rec.found_inf, rec.batch, rec.batch_index = flag, batch, index
            if rec.norm_type is None:
                continue
            if world == 1:
                rec.total_norm = rec.local_norm
            elif math.isinf(rec.norm_type):
                rec.total_norm = next(maxes_iter)
            else:
                rec.total_norm = next(sums_iter) ** (1.0 / rec.norm_type)
        if out.slots is not None:
            self._verify(out.slots)

    def _precheck_planned(self) -> None:
        # Optimizers the last step used but this one has not touched yet: check them now
        # (read-only) so their flags join this step's collective.
        for ref, norm_type in self._plan:
            optimizer = ref()
            if optimizer is None or id(optimizer) in self._iteration.records:
                continue
            rec = self._iteration.record(optimizer)
            self._check(rec, optimizer, unscale=False)
            rec.norm_type = norm_type

    def _fingerprint(self) -> torch.Tensor:
        s = self._state
        return torch.stack(
            [
                s.scale.double(),
                s.growth_tracker.double(),
                s.hysteresis_tracker.double(),
                s.num_updates.double(),
            ]
        )

    def _verify(self, table: torch.Tensor) -> None:
        rows = [tuple(row) for row in table.tolist()]  # host sync, on check steps only
        if len(set(rows)) == 1:
            return
        majority = max(set(rows), key=lambda r: (rows.count(r), -rows.index(r)))
        bad = [rank for rank, row in enumerate(rows) if row != majority]
        names = ("scale", "growth_tracker", "hysteresis_tracker", "num_updates")
        detail = "; ".join(f"rank {r}: {dict(zip(names, rows[r], strict=True))}" for r in bad)
        raise InconsistentStateError(
            f"GradScaler state differs across ranks {bad} (majority: {dict(zip(names, majority, strict=True))}); "
            f"{detail}. Ranks must run the same scaler calls and load the same checkpoint."
        )

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
        rec = self._iteration.record(optimizer)
        if rec.stage is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        self._check(rec, optimizer, unscale=True)
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
        if not (max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm must be finite and >= 0, got {max_norm!r}.")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}.")
        if not self._enabled:
            return self._clip_unscaled(optimizer, max_norm, norm_type)
        self._require_init("clip_grad_norm_")
        rec = self._iteration.record(optimizer)
        if rec.clipped:
            raise RuntimeError(
                "clip_grad_norm_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        unscale = rec.unscaled or not _fused(optimizer)
        self._check(rec, optimizer, unscale=unscale)
        if rec.norm_type != norm_type:
            rec.norm_type, rec.local_norm, rec.total_norm = norm_type, None, None
        self._reduce()
        assert rec.total_norm is not None
        coef = torch.clamp(max_norm / (rec.total_norm + 1e-6), max=1.0)
        rec.clipped = True
        if rec.unscaled:
            rec.stage = OptState.UNSCALED
            assert rec.grads is not None
            _mul_(rec.grads.tensors(), coef)
            rec.grads.refresh_versions()
        else:
            rec.clip_coef = coef
        return rec.total_norm

    def _clip_unscaled(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float
    ) -> torch.Tensor:
        # Disabled scaler (bf16/fp32 training): a plain shard-aware clip, one collective.
        grads = GradSet(optimizer, self._reducer.rank)
        tensors = grads.tensors()
        device = tensors[0].device if tensors else torch.device("cpu")
        local = grads.local_norm(norm_type, device, self._kernel, None)
        if self._reducer.world_size == 1:
            total = local
        elif math.isinf(norm_type):
            total = self._reducer.reduce(Packed([], [], [local])).maxes[0]
        else:
            total = self._reducer.reduce(Packed([], [local**norm_type], [])).sums[0] ** (1.0 / norm_type)
        _mul_(tensors, torch.clamp(max_norm / (total + 1e-6), max=1.0))
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
        rec = self._iteration.record(optimizer)
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if _fused(optimizer):
            self._check(rec, optimizer, unscale=rec.unscaled)
            self._reduce()
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
        self._check(rec, optimizer, unscale=True)
        self._apply_pending_clip(rec)
        self._reduce()
        assert rec.batch is not None
        retval = None
        if not rec.batch.read()[rec.batch_index]:
            retval = optimizer.step(*args, **kwargs)
        rec.stage = OptState.STEPPED
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Apply the scaling rule with the step's job-wide ``found_inf`` (or set ``new_scale``).

        All ranks compute the same new state. In-place on the state tensors (CUDA-graph safe).
        Host syncs: none, except with ``on_min_scale`` "warn"/"raise" on steps whose flags
        were not already read by ``step`` (one read).
        """
        if not self._enabled:
            return
        self._require_init("update")
        if new_scale is not None:
            self._set_scale(new_scale)
        else:
            records = [r for r in self._iteration.records.values() if r.checked]
            if not records:
                raise ScalerUsageError("No inf checks were recorded prior to update.")
            self._reduce()
            found = records[0].found_inf
            for rec in records[1:]:
                found = found + rec.found_inf  # type: ignore[operator]
            assert found is not None
            old = self._state
            new = policy.update(old, found, self._config)
            for dst, src in zip(old, new, strict=True):
                dst.copy_(src)
            self._num_updates_host += 1
            if self._config.on_min_scale != "clamp" and self._config.min_scale is not None:
                self._report_min_scale()
        self._plan = [
            (rec.optimizer, rec.norm_type if rec.clipped else None)
            for rec in self._iteration.records.values()
            if rec.checked
        ]
        self._iteration = Iteration()

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
        if isinstance(new_scale, bool) or not isinstance(new_scale, (int, float)):
            raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}.")
        if not (math.isfinite(new_scale) and new_scale > 0):
            raise ValueError(f"new_scale must be finite and > 0, got {new_scale!r}.")
        self._state.scale.fill_(float(new_scale))

    def _report_min_scale(self) -> None:
        count = int(self._state.num_min_scale_events.item())  # host sync, warn/raise only
        if count == self._min_event_host_seen:
            return
        self._min_event_host_seen = count
        message = (
            f"An overflow found the loss scale at min_scale={self._config.min_scale} "
            f"({count} time(s) so far); the step was skipped and the scale cannot back off further."
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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain Python values (see :mod:`distscale.checkpoint`).

        Empty when disabled, as torch. One host sync. Call it after ``update()``. The scaler is a
        ``torch.distributed.checkpoint`` Stateful: every rank holds the same state.
        """
        if not self._enabled:
            return {}
        values = torch.stack([t.double().cpu() for t in self._state]).tolist()
        names = policy.ScaleState._fields
        state = {
            name: (float(v) if policy.STATE_DTYPES[name].is_floating_point else int(v))
            for name, v in zip(names, values, strict=True)
        }
        return checkpoint.build(self._config, state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from ``state_dict()`` (this format or torch.amp.GradScaler's).

        Validates everything first: a bad state raises and leaves the scaler unchanged. Works
        before the first ``scale()``. No-op when disabled, as torch.
        """
        if not self._enabled:
            return
        config, values = checkpoint.validate(state_dict, self._config)
        self._config = config
        for name, tensor in zip(policy.ScaleState._fields, self._state, strict=True):
            tensor.fill_(values[name])
        self._num_updates_host = values["num_updates"]
        self._min_event_host_seen = values["num_min_scale_events"]

    def __getstate__(self) -> dict[str, Any]:
        if self._iteration.records:
            raise ScalerUsageError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = self.__dict__.copy()
        state["_state"] = self._state.to("cpu")
        state["_initialized"] = False
        state["_plan"] = []
        state["_reducer"] = ReduceGroup(None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _mul_(tensors: list[torch.Tensor], factor: torch.Tensor) -> None:
    # Grouped by (device, dtype) like torch.nn.utils.clip_grad_norm_, so results match it bitwise.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for (device, _), group in groups.items():
            torch._foreach_mul_(group, factor.to(device))
