"""Records of 0-dim tensors declared once (distscale.fields), and what derives from them."""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import pytest
import torch

from distscale import checkpoint, fields
from distscale.config import ScalerConfig
from distscale.fields import Field
from distscale.policy import ScaleState
from distscale.stats import ScalerStats


class Toy(NamedTuple):
    scale: Annotated[torch.Tensor, Field(torch.float32, lambda c: c.init_scale)]
    count: Annotated[torch.Tensor, Field(torch.int64, 0)]
    flag: Annotated[torch.Tensor, Field(torch.bool, False, since=2)]
    gauge: Annotated[torch.Tensor, Field(torch.float32, math.nan)]


class Undeclared(NamedTuple):
    value: torch.Tensor


def test_allocate_follows_the_declarations() -> None:
    toy = fields.allocate(Toy, ScalerConfig(init_scale=8.0))
    assert [t.dtype for t in toy] == [torch.float32, torch.int64, torch.bool, torch.float32]
    assert all(t.dim() == 0 for t in toy)
    assert fields.to_host(toy._asdict()) == pytest.approx(
        {"scale": 8.0, "count": 0, "flag": False, "gauge": math.nan}, nan_ok=True
    )
    host = fields.to_host(toy._asdict())
    assert type(host["scale"]) is float and type(host["count"]) is int and type(host["flag"]) is bool
    assert fields.fields(Toy)["flag"].since == 2 and fields.dtypes(Toy)["count"] is torch.int64


def test_a_field_without_its_declaration_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Undeclared.value must be declared as Annotated"):
        fields.fields(Undeclared)


def test_checkpoint_keys_and_version_derive_from_the_declarations() -> None:
    assert tuple(checkpoint.STATE_FIELDS) == ScaleState._fields
    assert tuple(checkpoint.STATS_FIELDS) == ScalerStats._fields
    declared = (
        *checkpoint.STATE_FIELDS.values(),
        *checkpoint.STATS_FIELDS.values(),
        *checkpoint.RULES_FIELDS.values(),
    )
    newest = max(f.since for f in declared)
    assert checkpoint.FORMAT_VERSION == newest == max(checkpoint.CONFIG_SINCE.values()) == 5
    assert checkpoint._keys_in(checkpoint.STATE_FIELDS, 1) == set(ScaleState._fields) - {
        "steps_since_rescale",
        "overflows_since_backoff",
        "calibrated",
        "amax_window",
    }
