"""Which local tensor each gradient is read from and which rank counts it (distscale.sharding),
classified once per parameter list; one process, with the scaler's group given as ranks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from distscale.overflow import ClassificationCache, GradSet


def _group(ranks: tuple[int, ...], me: int) -> Any:
    return SimpleNamespace(global_ranks=ranks, global_rank=me)


def test_plain_tensors_on_one_rank_count_and_on_several_are_unresolved() -> None:
    params = [nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    alone = GradSet(opt).classification
    assert alone.unresolved == [] and alone.kinds == [0, 0]
    shared = GradSet(opt, ClassificationCache(group=_group((0, 1), 1))).classification
    assert [(g, i) for g, i, _ in shared.unresolved] == [(0, 0), (0, 1)]
    assert "no mesh is declared" in shared.unresolved[0][2]
    grads = GradSet(opt, ClassificationCache(group=_group((0, 1), 1)))
    assert all(g.norm_tensor is None for g in grads.grads)  # never counted by a guess


def test_param_group_key_without_mesh_is_unresolved_with_its_reason() -> None:
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    opt = torch.optim.SGD([{"params": [param], "replicate_dims": ("dp",)}], lr=0.1)
    found = GradSet(opt, ClassificationCache(group=_group((0, 1), 0))).classification
    assert "the scaler has no mesh" in found.unresolved[0][2]


def test_classification_follows_parameter_list_and_declarations() -> None:
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    cache = ClassificationCache(group=_group((0, 1), 0))
    first = cache.classification(opt)
    assert cache.classification(opt) is first  # cached
    opt.param_groups[0]["replicate_dims"] = ()  # a new declaration is a new classification
    assert cache.classification(opt) is not first
