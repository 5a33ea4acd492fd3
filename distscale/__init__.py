"""distscale: dynamic loss scaling for fp16 training whose gradients are spread over many ranks.

``from distscale import GradScaler`` replaces ``torch.amp.GradScaler`` and ``ShardedGradScaler``.
"""

from distscale.config import ScalerConfig
from distscale.diagnostics import FaultReport, NonFiniteGrad, OverflowReport
from distscale.errors import (
    FaultError,
    InconsistentStateError,
    MinScaleError,
    ReplicationError,
    ScalerUsageError,
)
from distscale.policy import ScaleState
from distscale.scaler import GradScaler, OptState
from distscale.sinks import JsonlSink, LoggingSink, MetricsLogger, MetricsSink, TensorBoardSink
from distscale.skip import SkipAwareScheduler, ema_update_
from distscale.stats import ScalerStats

__version__ = "0.1.0"

__all__ = [
    "FaultError",
    "FaultReport",
    "GradScaler",
    "InconsistentStateError",
    "JsonlSink",
    "LoggingSink",
    "MetricsLogger",
    "MetricsSink",
    "MinScaleError",
    "NonFiniteGrad",
    "OptState",
    "OverflowReport",
    "ReplicationError",
    "ScaleState",
    "ScalerConfig",
    "ScalerStats",
    "ScalerUsageError",
    "SkipAwareScheduler",
    "TensorBoardSink",
    "__version__",
    "ema_update_",
]
