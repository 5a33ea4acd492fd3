"""GradScaler's observability surface: metrics, the skipped-step signal, overflow reports.

A mixin of :class:`distscale.GradScaler` (kept apart so the façade stays about the step); the
values themselves live in :mod:`distscale.stats` and are advanced by ``update()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from distscale import fields, underflow
from distscale._scaler_base import ScalerAttrs
from distscale.diagnostics import OverflowReport


class MetricsMixin(ScalerAttrs):
    @staticmethod
    def _step_outcome(records: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        # The step's job-wide flag and what the stats want to know about it; no host sync.
        flags = torch.stack([rec.found_inf for rec in records])
        norms = [(rec.total_norm, rec.norm_type) for rec in records if rec.clipped]
        grad_norm = None
        if norms:  # several clipped optimizers: the norm over all of them (same norm_type)
            values = torch.stack([n for n, _ in norms]).float()
            p = norms[0][1]
            grad_norm = values[0] if len(norms) == 1 else torch.linalg.vector_norm(values, p)
        counts = [rec.underflow_reduced for rec in records if rec.underflow_reduced is not None]
        under = underflow.fractions(torch.stack(counts).sum(0)) if counts else None
        skipped = None  # known on the host only if step() already read every record's flags
        if all(rec.batch is not None and rec.batch.host is not None for rec in records):
            skipped = any(rec.batch.host[rec.batch_index] for rec in records)
        extra = {
            "overflows": (flags > 0).sum(),
            "grad_norm": grad_norm,
            "underflow": under,
            "skipped_host": skipped,
        }
        return flags.sum(), extra

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
        return {k: v.clone() for k, v in named.items()}

    def metrics(self) -> dict[str, float | int | bool]:
        """What the scaler did, as Python numbers. One host sync (one ``tolist()``); read it on the
        steps you log, on any rank (every rank holds the same values). Empty when disabled.

        Keys: ``scale``, ``growth_tracker``, ``hysteresis_tracker``, ``steps`` (updates applied),
        ``skipped_steps``, ``min_scale_events`` and the counters of
        :class:`~distscale.stats.ScalerStats` (``overflows``, ``consecutive_overflows``,
        ``max_consecutive_overflows``, ``steps_since_overflow``, ``steps_at_min_scale``,
        ``step_was_skipped``, ``grad_norm``, ``zero_fraction``, ``underflow_fraction``; NaN: not
        measured).
        """
        tensors = self.metric_tensors()
        if not tensors:
            return {}
        return fields.to_host(tensors)  # host sync

    @property
    def last_overflow_report(self) -> OverflowReport | None:
        """With ``overflow_diagnostics``: the findings of the last overflow step, on rank 0 of the
        scaler's group (None on other ranks, and before any overflow)."""
        return self._sync.last_overflow_report

    def set_parameter_names(self, named: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name parameters in overflow reports and errors: a module (its ``named_parameters()``) or
        ``(name, param)`` pairs. Without it, reports name optimizer positions. Local only."""
        pairs = named.named_parameters() if isinstance(named, torch.nn.Module) else named
        self._sync.parameter_names = {id(p): name for name, p in pairs}

    def register_model(self, model: torch.nn.Module) -> None:
        """Learn ``model``'s parameter names (``set_parameter_names``) and what its DDP and FSDP1
        wrappers tell about which ranks hold copies of which parameters (their process groups,
        which their tensors do not carry), for ``clip_grad_norm_`` (see :mod:`distscale.layout`).

        Call it on every rank after wrapping, before the first step. Local only: no collective,
        no host sync. Raises ValueError if a wrapper spans ranks outside the scaler's group.
        """
        self.set_parameter_names(model)
        self._sync.cache.layout.register_model(model, self._sync.cache.group.global_ranks)
