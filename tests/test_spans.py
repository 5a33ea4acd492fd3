"""Contiguous spans (distscale.kernels.spans): the merge rule, and coalescing for the torch and
reference backends, bitwise equal to working per tensor."""

from __future__ import annotations

import pytest
import torch

import distscale
from distscale import kernels
from distscale.kernels import spans

INF = float("inf")


def test_span_merging() -> None:
    # (address, numel, counted) with 4-byte elements.
    merged = spans.merge_spans([(1000, 10, 10), (1040, 5, 0), (1060, 4, 4), (2000, 3, 3), (1076, 2, 1)], 4)
    # 1000..1040 counted + 1040..1060 uncounted merge; 1060 does not (its counted elements would
    # follow uncounted ones); 1060..1076 + 1076..1084 merge with a counted prefix of 5.
    assert merged == [(1000, 15, 10), (1060, 6, 5), (2000, 3, 3)]
    assert spans.merge_spans([(1000, 4, 4), (1008, 4, 4)], 4) == [
        (1000, 4, 4),
        (1008, 4, 4),
    ]  # overlap


def _tiled(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Views of one flat buffer, as DDP's bucket views: three back to back, a gap, two more back
    to back (one of them 2-D), a transposed (not contiguous) one, and an empty one."""
    gen = torch.Generator().manual_seed(0)
    flat = (torch.randn(1000, generator=gen) * 8).to(dtype)
    views = [flat[0:100], flat[100:130], flat[130:400], flat[410:500], flat[500:700].view(10, 20)]
    views += [flat[700:900].view(10, 20).t(), flat[900:900]]
    return flat, views


def test_separately_allocated_tensors_are_returned_as_they_are() -> None:
    tensors = [torch.randn(5), torch.randn(7)]
    assert spans.coalesce(tensors) is tensors
    _, views = _tiled()
    assert spans.coalesce(views[:1]) == views[:1]


def test_runs_of_back_to_back_views_become_one_view_each() -> None:
    flat, views = _tiled()
    out = spans.coalesce(views)
    runs = sorted((t.storage_offset(), t.numel()) for t in out if t.dim() == 1 and t.numel() > 100)
    assert (0, 400) in runs and (410, 290) in runs  # [0:400) and [410:700) merged
    assert sum(t.numel() for t in out) == sum(v.numel() for v in views)
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in out)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_check_on_spans_is_bitwise_the_check_per_tensor(backend: str, dtype: torch.dtype) -> None:
    results = []
    for merge in (False, True):
        flat, views = _tiled(dtype)
        views[3][5] = INF
        found = torch.zeros(())
        impl = kernels.reference if backend == "reference" else kernels.torch_ops
        impl.check_and_unscale_(spans.coalesce(views) if merge else views, found, torch.tensor(1 / 3.0))
        results.append((found.item(), flat.clone()))
    (f1, a), (f2, b) = results
    assert f1 == f2 == 1.0
    assert torch.equal(a.nan_to_num(), b.nan_to_num())  # the gap [400:410) and the rest untouched alike
    assert torch.equal(a[400:410], _tiled(dtype)[0][400:410])


def test_the_plan_is_reused_for_new_views_and_rebuilt_when_layouts_change() -> None:
    spans._cache.clear()
    flat, views = _tiled()
    spans.coalesce(views)
    plan = next(iter(spans._cache.values()))
    again = [flat[0:100], flat[100:130], flat[130:400], flat[410:500], flat[500:700].view(10, 20)]
    again += [flat[700:900].view(10, 20).t(), flat[900:900]]
    spans.coalesce(again)  # new tensor objects, same memory: the same plan
    assert len(spans._cache) == 1 and next(iter(spans._cache.values())) is plan
    other = torch.randn(1000)
    moved = [other[0:100], other[100:130]]
    assert sum(t.numel() for t in spans.coalesce(moved)) == 130 and len(spans._cache) == 2


def test_adjacent_tensors_of_different_storages_are_not_merged() -> None:
    a, b = torch.randn(1000)[10:], torch.randn(1000)[10:]
    assert len(spans.coalesce([a, b])) == 2


def test_scaler_on_a_flat_gradient_buffer_is_bitwise_torchs_and_calls_the_op_per_span(monkeypatch) -> None:
    calls: list[int] = []
    original = torch._amp_foreach_non_finite_check_and_unscale_
    results = []
    for kind in ("distscale", "torch"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (64, 32, 128, 16)]
        flat = torch.zeros(sum(p.numel() for p in params))
        scaler = distscale.GradScaler("cpu") if kind == "distscale" else torch.amp.GradScaler("cpu")
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        start = 0
        for p in params:  # a user's flat gradient buffer: persistent views
            p.grad = flat[start : start + p.numel()]
            start += p.numel()
        monkeypatch.setattr(
            torch,
            "_amp_foreach_non_finite_check_and_unscale_",
            lambda ts, *a: calls.append(len(ts)) or original(ts, *a),
        )
        for step in range(4):
            flat.copy_(torch.randn(flat.numel(), generator=torch.Generator().manual_seed(step)) * 100)
            if step == 2:
                flat[7] = INF
            scaler.scale(torch.ones(()))
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", original)
        results.append(([p.detach().clone() for p in params], scaler.get_scale()))
    assert results[0][1] == results[1][1]
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0], strict=True))
    assert calls[:4] == [1, 1, 1, 1] and calls[4:] == [4, 4, 4, 4]  # ours: one span; torch: per tensor
