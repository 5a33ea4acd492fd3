"""GradScaler's persistence: ``state_dict``/``load_state_dict`` and pickling.

A mixin of :class:`distscale.GradScaler`; the format itself is :mod:`distscale.checkpoint`.
"""

from __future__ import annotations

from typing import Any

from distscale import checkpoint, fields, policy, stats
from distscale._scaler_base import ScalerAttrs
from distscale.collectives import ReduceGroup
from distscale.errors import ScalerUsageError


class StateMixin(ScalerAttrs):
    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain Python values (see :mod:`distscale.checkpoint`).

        Empty when disabled, as torch. One host sync. Call it after ``update()``. The scaler is a
        ``torch.distributed.checkpoint`` Stateful: every rank holds the same state.
        """
        if not self._enabled:
            return {}
        plain = fields.to_host({**self._state._asdict(), **self._stats._asdict()})  # host sync
        state = {name: plain[name] for name in policy.ScaleState._fields}
        return checkpoint.build(
            self._config, state, {name: plain[name] for name in stats.ScalerStats._fields}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from ``state_dict()`` (this format or torch.amp.GradScaler's).

        Validates everything first: a bad state raises and leaves the scaler unchanged. Works
        before the first ``scale()``. No-op when disabled, as torch.
        """
        if not self._enabled:
            return
        config, values, stat_values = checkpoint.validate(state_dict, self._config)
        self._config = config
        for name, tensor in zip(policy.ScaleState._fields, self._state, strict=True):
            tensor.fill_(values[name])
        for name, tensor in zip(stats.ScalerStats._fields, self._stats, strict=True):
            tensor.fill_(stat_values[name])
        self._skipped_host = bool(stat_values["step_was_skipped"])
        self._sync.num_updates_host = values["num_updates"]
        self._min_event_host_seen = values["num_min_scale_events"]

    def __getstate__(self) -> dict[str, Any]:
        if self._sync.iteration.records:
            raise ScalerUsageError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = self.__dict__.copy()
        state["_state"] = self._state.to("cpu")
        state["_stats"] = self._stats.to("cpu")
        state["_initialized"] = False
        # Process groups do not pickle: an unpickled scaler reduces over the default group.
        state["_reducer"] = ReduceGroup(None)
        state["_sync"] = self._sync.fresh(state["_reducer"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
