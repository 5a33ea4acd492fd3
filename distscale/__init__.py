"""distscale: dynamic loss scaling for fp16 training whose gradients are spread over many ranks.

``from distscale import GradScaler`` replaces ``torch.amp.GradScaler`` and ``ShardedGradScaler``.
"""

from distscale.config import ScalerConfig
from distscale.errors import InconsistentStateError, MinScaleError, ScalerUsageError
from distscale.policy import ScaleState
from distscale.scaler import GradScaler, OptState

__version__ = "0.1.0"

__all__ = [
    "GradScaler",
    "InconsistentStateError",
    "MinScaleError",
    "OptState",
    "ScaleState",
    "ScalerConfig",
    "ScalerUsageError",
    "__version__",
]
