"""Records of 0-dim tensors whose fields are declared once: name, dtype and initial value.

The scaler's state (:class:`~distscale.policy.ScaleState`) and metrics
(:class:`~distscale.stats.ScalerStats`) are NamedTuples of 0-dim tensors. Each field is declared
once, as ``name: Annotated[torch.Tensor, Field(dtype, initial)]``; allocation, dtypes, checkpoint
keys and format version, metric names and host conversion are derived from that line, so adding a
counter means declaring it and writing its rule, nothing else.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import torch

from distscale.config import ScalerConfig

__all__ = ["Field", "allocate", "dtypes", "fields", "initial_values", "to_host"]

Value = bool | int | float
R = TypeVar("R", bound=tuple[Any, ...])


@dataclass(frozen=True, slots=True)
class Field:
    """How one field of a record is stored and starts."""

    dtype: torch.dtype
    initial: Value | Callable[[ScalerConfig], Value]
    """A value, or a function of the scaler's settings (``init_scale``, say)."""
    since: int = 1
    """The checkpoint format version that introduced it (see :mod:`distscale.checkpoint`): older
    checkpoints lack it and load with its initial value; a new field raises the format version."""
    length: Callable[[ScalerConfig], int] | None = None
    """None: a 0-dim tensor. Else a 1-D tensor of this length (a history), every entry ``initial``."""


@cache
def fields(record: type) -> dict[str, Field]:
    """``record``'s fields in declaration order, with their ``Field`` metadata."""
    hints = typing.get_type_hints(record, include_extras=True)
    out = {}
    for name in record._fields:  # type: ignore[attr-defined]
        declared = [m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, Field)]
        if len(declared) != 1:
            raise TypeError(
                f"{record.__name__}.{name} must be declared as Annotated[torch.Tensor, Field(...)]."
            )
        out[name] = declared[0]
    return out


def dtypes(record: type) -> dict[str, torch.dtype]:
    return {name: f.dtype for name, f in fields(record).items()}


def initial_values(record: type, config: ScalerConfig) -> dict[str, Value]:
    return {
        name: f.initial(config) if callable(f.initial) else f.initial for name, f in fields(record).items()
    }


def allocate(record: type[R], config: ScalerConfig, device: torch.device | str = "cpu") -> R:
    """A fresh ``record``: every field at its initial value, on ``device``."""
    values = initial_values(record, config)
    return record(
        **{
            name: torch.full(
                () if f.length is None else (f.length(config),), values[name], dtype=f.dtype, device=device
            )
            for name, f in fields(record).items()
        }
    )


def to_host(named: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """0-dim tensors as Python bools, ints and floats (by dtype), 1-D ones as lists of them. One
    host sync for all of them."""
    flat = torch.cat([t.double().reshape(-1).cpu() for t in named.values()]).tolist()  # host sync
    out: dict[str, Any] = {}
    at = 0
    for name, tensor in named.items():
        if tensor.dtype is torch.bool:
            kind: Callable[[float], Value] = bool
        elif tensor.dtype.is_floating_point:
            kind = float
        else:
            kind = int
        values = [kind(v) for v in flat[at : at + tensor.numel()]]
        out[name] = values if tensor.dim() else values[0]
        at += tensor.numel()
    return out
