"""GradSet's lean per-step path (distscale.overflow): the last step's grouping and span plan are
reused only while every ``param.grad`` is the same live object at the same address; anything else
rebuilds, results stay bitwise torch's, and no gradient is kept alive."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

import distscale
from distscale.overflow import ClassificationCache, GradSet

INF = float("inf")
N, NUMEL = 6, 4


def _flat_params() -> tuple[list[nn.Parameter], torch.Tensor]:
    params = [nn.Parameter(torch.ones(NUMEL)) for _ in range(N)]
    flat = torch.zeros(N * NUMEL)
    for i, p in enumerate(params):
        p.grad = flat[i * NUMEL : (i + 1) * NUMEL]
    return params, flat


def _lean(cache: ClassificationCache, opt: torch.optim.Optimizer) -> bool:
    """Whether the next GradSet takes the lean path."""
    return GradSet(opt, cache).lean


def test_persistent_grads_take_the_lean_path_from_the_third_step() -> None:
    params, _ = _flat_params()
    opt = torch.optim.SGD(params, lr=0.0)
    cache = ClassificationCache()
    # 1st: first sight; 2nd: the same first grad again, so remembered; 3rd on: reused.
    assert [_lean(cache, opt) for _ in range(4)] == [False, False, True, True]
    grads = GradSet(opt, cache)
    (group,) = grads.groups().values()
    assert len(group.coalesced()) == 1  # the six views checked as one span


def test_fresh_grads_every_step_never_build_the_memo() -> None:
    params = [nn.Parameter(torch.ones(NUMEL)) for _ in range(N)]
    opt = torch.optim.SGD(params, lr=0.0)
    cache = ClassificationCache()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(NUMEL)
        assert not _lean(cache, opt)
        assert cache.entry(opt).last_grads is None


def _assign_new(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    params[2].grad = params[2].grad.clone()  # a new object


def _assign_data(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    params[2].grad.data = params[2].grad.data.clone()  # same object, new memory (FSDP1 does this)


def _set_none(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    params[2].grad = None


def _new_buffer(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    other = torch.zeros_like(flat)
    for i, p in enumerate(params):
        p.grad = other[i * NUMEL : (i + 1) * NUMEL]


def _param_list(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    pass  # the optimizer's list changes below


@pytest.mark.parametrize(
    "change", [_assign_new, _assign_data, _set_none, _new_buffer], ids=lambda f: f.__name__.strip("_")
)
def test_any_change_of_a_grad_object_or_its_memory_rebuilds(
    change: Callable[[list[nn.Parameter], torch.Tensor], None],
) -> None:
    params, flat = _flat_params()
    opt = torch.optim.SGD(params, lr=0.0)
    cache = ClassificationCache()
    for _ in range(3):
        GradSet(opt, cache)
    change(params, flat)
    grads = GradSet(opt, cache)
    assert not grads.lean  # rebuilt from the grads as they are
    want = [p.grad for p in params if p.grad is not None]
    assert len(grads.tensors) == len(want) and all(a is b for a, b in zip(grads.tensors, want, strict=True))


def test_a_changed_parameter_list_rebuilds() -> None:
    params, _ = _flat_params()
    opt = torch.optim.SGD(params, lr=0.0)
    cache = ClassificationCache()
    for _ in range(3):
        GradSet(opt, cache)
    extra = nn.Parameter(torch.ones(2))
    extra.grad = torch.ones(2)
    opt.param_groups[0]["params"].append(extra)  # in place: the same list object, one more entry
    grads = GradSet(opt, cache)
    assert not grads.lean and grads.tensors[-1] is extra.grad


def test_the_memo_keeps_no_gradient_alive() -> None:
    params = [nn.Parameter(torch.ones(NUMEL)) for _ in range(N)]
    for p in params:
        p.grad = torch.randn(NUMEL)  # separately allocated, persistent
    opt = torch.optim.SGD(params, lr=0.0)
    cache = ClassificationCache()
    for _ in range(3):
        GradSet(opt, cache)
    assert cache.entry(opt).last_grads is not None
    watch = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(w() is None for w in watch)
    # New grads, possibly at the freed addresses: a dead reference never matches.
    for p in params:
        p.grad = torch.randn(NUMEL)
    assert not GradSet(opt, cache).lean


def test_results_are_bitwise_torch_across_lean_steps_and_changes() -> None:
    """unscale_/step/update on a flat gradient buffer for several steps, with an inf planted in a
    different view each step and the layout changed midway: bitwise torch's scaler."""
    runs = []
    for make in (distscale.GradScaler, torch.amp.GradScaler):
        torch.manual_seed(0)
        params, flat = _flat_params()
        opt = torch.optim.SGD(params, lr=0.5)
        scaler = make("cpu", init_scale=2.0**4, growth_interval=2)
        seen = []
        for step in range(8):
            if step == 5:
                _new_buffer(params, flat)
                flat = torch.cat([p.grad for p in params]).detach()  # only for the fill below
                for i, p in enumerate(params):
                    p.grad = flat[i * NUMEL : (i + 1) * NUMEL]
            loss = sum((p * (k + 1)).sum() for k, p in enumerate(params))
            flat.zero_()
            scaler.scale(loss).backward()
            if step in (1, 4, 6):
                params[step % N].grad[1] = INF
            scaler.unscale_(opt)
            seen.append(flat.clone())
            scaler.step(opt)
            scaler.update()
            seen.append(torch.tensor(scaler.get_scale()))
        runs.append((seen, [p.detach().clone() for p in params]))
    (ours, ours_params), (theirs, theirs_params) = runs
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(ours, theirs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ours_params, theirs_params, strict=True))
