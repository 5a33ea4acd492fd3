"""The attributes GradScaler's mixins share (set by ``GradScaler.__init__``), declared once."""

from __future__ import annotations

from distscale import policy, stats
from distscale._step import StepSync
from distscale.config import ScalerConfig


class ScalerAttrs:
    _enabled: bool
    _config: ScalerConfig
    _state: policy.ScaleState
    _stats: stats.ScalerStats
    _skipped_host: bool | None  # the last step's skip, when already known on the host
    _sync: StepSync
    _kernel: str
    _min_event_host_seen: int
