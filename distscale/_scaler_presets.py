"""GradScaler's preset constructors: the DeepSpeed, Megatron and fairseq rules.

A mixin of :class:`distscale.GradScaler`; the translations are :mod:`distscale.presets`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from typing_extensions import Self

from distscale import presets


class PresetsMixin:
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
