"""The fused check (distscale.kernels.triton_ops) in Triton's interpreter, against the reference.

Every dtype x layout x mode, clean and with inf/NaN planted; backend selection under the
interpreter; the span table and its cache; the scaler on kernel="triton" against "torch"."""

from __future__ import annotations

import pytest
import torch

from distscale import kernels
from distscale.kernels import _table, triton_ops
from distscale.overflow import ClassificationCache, GradSet
from tests.kernel_cases import (
    DTYPES,
    INF,
    INV,
    NUMERIC_CASES,
    bits_equal,
    check_case,
    check_group,
    gradset_optimizer,
    layout,
    norm_ok,
    plant,
    reference_norm,
    train_scaler,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("case", list(NUMERIC_CASES))
def test_check_kernel_matches_the_reference(case: str) -> None:
    spec = NUMERIC_CASES[case]
    tensors, counts, block = layout(spec["layout"], DTYPES[spec["dtype"]])
    if spec["plant"] is not None:
        plant(tensors, *spec["plant"])
    problem = check_case(tensors, counts, block, spec["unscale"], spec["norm"], triton_ops.fused_check_)
    assert problem is None, problem


def test_auto_on_the_cpu_is_torchs_op_bitwise() -> None:
    assert kernels.backend("auto", CPU, torch.float16) == "torch"
    grads = [torch.randn(100).half(), torch.randn(7).half()]
    grads[1][3] = INF
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    f1, f2 = torch.zeros(()), torch.zeros(())
    check_group(ours, f1, torch.tensor(INV), None, "auto")
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, torch.tensor(INV))
    assert torch.equal(f1, f2)
    assert all(bits_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_triton_is_selected_on_cpu_tensors_in_the_interpreter() -> None:
    assert triton_ops.INTERPRETED
    assert kernels.backend("triton", CPU, torch.bfloat16) == "triton"


def test_an_unsupported_dtype_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="float64"):
        kernels.backend("triton", CPU, torch.float64)


def test_a_norm_type_the_pass_does_not_take_falls_back_to_two_passes() -> None:
    grads = [torch.randn(50), torch.randn(3, 4)]
    before = [g.clone() for g in grads]
    norm = check_group(grads, torch.zeros(()), torch.tensor(0.5), 1.0, "triton")
    want = reference_norm(before, None, 1.0)
    assert norm is not None and norm_ok(float(norm), want), (norm, want)
    assert all(torch.equal(g, b * 0.5) for g, b in zip(grads, before, strict=True))


def test_the_span_table_is_cached_per_layout() -> None:
    triton_ops.clear_cache()
    grads = [torch.randn(100), torch.randn(33)]
    triton_ops.fused_check_(grads, torch.zeros(()), None, 2.0)
    plan = next(iter(_table._cache.values()))
    triton_ops.fused_check_(grads, torch.zeros(()), None, 2.0)
    # New tensor objects over the same memory (set_to_none + caching allocator): same table.
    triton_ops.fused_check_([g.detach() for g in grads], torch.zeros(()), None, 2.0)
    assert len(_table._cache) == 1 and next(iter(_table._cache.values())) is plan
    triton_ops.fused_check_([grads[0], torch.randn(33)], torch.zeros(()), None, 2.0)
    assert len(_table._cache) == 2


def test_views_tiling_one_buffer_merge_into_spans() -> None:
    triton_ops.clear_cache()
    tensors, counts, block = layout("flat", torch.float16)
    triton_ops.fused_check_(tensors, torch.zeros(()), None, 2.0, norm_numels=counts, block=block)
    plan = next(iter(_table._cache.values()))
    # [counted, uncounted] merge; then [counted, partly counted] merge: two spans, no staging.
    assert plan.n_spans == 2 and not plan.staged, (plan.n_spans, len(plan.staged))


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("opt", ["sgd", "adamw-fused"])
def test_the_scaler_on_triton_matches_torch(opt: str, clip: bool) -> None:
    s1, p1 = train_scaler("triton", opt, clip)
    s2, p2 = train_scaler("torch", opt, clip)
    assert s1 == s2
    # Without a clip the unscaled values are bitwise torch's; the fused norm rounds apart.
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b) if not clip else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_scalers_clip_takes_its_norm_in_the_check_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = kernels.norms
    monkeypatch.setattr(kernels, "norms", lambda *a, **k: calls.append(1) or original(*a, **k))
    train_scaler("triton", "sgd", clip=True, steps=3)
    train_scaler("triton", "adamw-fused", clip=True, steps=3)
    assert not calls, f"a separate norm pass ran {len(calls)} times"


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "linf"])
@pytest.mark.parametrize("unscale", [False, True], ids=["read", "unscale"])
@pytest.mark.parametrize("rank", [0, 1])
def test_gradset_fused_norm_matches_the_two_pass_norm(rank: int, unscale: bool, norm_type: float) -> None:
    from types import SimpleNamespace

    # On one process every element counts; as rank 1 of 4 (no layout declared), only the flat
    # shard does: its sizes prove FSDP1 shards it over the 4 ranks, the plain tensors are unknown.
    group = None if rank == 0 else SimpleNamespace(global_ranks=(0, 1, 2, 3), global_rank=1)
    results = []
    for kernel in ("triton", "torch"):
        opt = gradset_optimizer()
        grads = GradSet(opt, ClassificationCache(group=group), kernel)
        found = torch.zeros(())
        inv = torch.tensor(0.25) if unscale else None
        grads.check_(found, inv, norm_type)
        assert (grads._fused_norm is not None) == (kernel == "triton"), kernel
        norm = grads.local_norm(norm_type, CPU, None if unscale else torch.tensor(0.25))
        results.append((float(norm), found.item(), [p.grad.clone() for p in opt.param_groups[0]["params"]]))
    (n1, f1, g1), (n2, f2, g2) = results
    assert norm_ok(n1, n2) and f1 == f2, (n1, n2, f1, f2)
    assert all(bits_equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("unscale", [False, True], ids=["read", "unscale"])
@pytest.mark.parametrize("lay", ["sizes", "strided", "flat", "prefix"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_amax_in_the_fused_pass_is_the_largest_magnitude_as_read(dtype: str, lay: str, unscale: bool) -> None:
    tensors, counts, block = layout(lay, DTYPES[dtype])
    want = max((float(t.float().abs().max()) for t in tensors if t.numel()), default=0.0)
    amax = torch.zeros(())
    triton_ops.fused_check_(
        tensors, torch.zeros(()), torch.tensor(INV) if unscale else None, 2.0, norm_numels=counts, block=block,
        amax_out=amax,
    )  # fmt: skip
    assert amax.item() == want
