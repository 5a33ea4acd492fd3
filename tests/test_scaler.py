"""The GradScaler façade on one process: torch's API and misuse errors, host syncs, pickling, kernels,
and what a min-scale event does (on_min_scale)."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from distscale import GradScaler, MinScaleError, ScalerUsageError, kernels
from distscale.testing import count_host_syncs
from tests import tiny

INF = float("inf")
NAN = float("nan")
SCALERS = {
    "ours": lambda **kw: GradScaler("cpu", **kw),
    "torch": lambda **kw: torch.amp.GradScaler("cpu", **kw),
}


def make(seed=0, dtype=torch.float32, opt="sgd"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    elif opt == "adamw-fused":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    elif opt == "sgd-fused":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    else:
        raise AssertionError(opt)
    return model, optimizer


def loss_of(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(4, 6, generator=gen).to(dtype)
    return model(x).float().pow(2).mean()


# ---------------------------------------------------------------------------------- misuse


def _unscale_twice(s, m, o):
    s.scale(loss_of(m)).backward()
    s.unscale_(o)
    s.unscale_(o)


def _unscale_after_step(s, m, o):
    s.scale(loss_of(m)).backward()
    s.step(o)
    s.unscale_(o)


def _step_twice(s, m, o):
    s.scale(loss_of(m)).backward()
    s.step(o)
    s.step(o)


def _closure(s, m, o):
    s.scale(loss_of(m)).backward()
    s.step(o, closure=lambda: loss_of(m))


def _update_without_step(s, m, o):
    s.scale(loss_of(m)).backward()
    s.update()


MISUSE = {
    "unscale-twice": (
        _unscale_twice,
        RuntimeError,
        "unscale_() has already been called on this optimizer since the last update().",
    ),
    "unscale-after-step": (_unscale_after_step, RuntimeError, "unscale_() is being called after step()."),
    "step-twice": (_step_twice, RuntimeError, "step() has already been called since the last update()."),
    "closure": (_closure, RuntimeError, "Closure use is not currently supported if GradScaler is enabled."),
    "update-without-step": (
        _update_without_step,
        AssertionError,
        "No inf checks were recorded prior to update.",
    ),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_errors_match_torch(case):
    sequence, exc, message = MISUSE[case]
    messages = {}
    for name, factory in SCALERS.items():
        model, opt = make()
        with pytest.raises(exc) as info:
            sequence(factory(), model, opt)
        messages[name] = str(info.value)
    assert messages["ours"] == messages["torch"]
    assert messages["ours"] == message


def test_update_without_step_is_scaler_usage_error():
    model, _ = make()
    scaler = GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    with pytest.raises(ScalerUsageError, match=r"No inf checks were recorded prior to update\."):
        scaler.update()


@pytest.mark.parametrize("method", ["step", "unscale_", "update", "clip_grad_norm_"])
def test_calls_before_scale_raise_runtime_and_assertion_error(method):
    model, opt = make()
    loss_of(model).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    scaler = GradScaler("cpu")
    call = {
        "step": lambda: scaler.step(opt),
        "unscale_": lambda: scaler.unscale_(opt),
        "update": lambda: scaler.update(),
        "clip_grad_norm_": lambda: scaler.clip_grad_norm_(opt, 1.0),
    }[method]
    with pytest.raises(ScalerUsageError) as info:
        call()
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, AssertionError)
    assert "_scale is None" in str(info.value)
    if method != "clip_grad_norm_":
        # Word for word what torch says.
        theirs = torch.amp.GradScaler("cpu")
        with pytest.raises(AssertionError) as torch_info:
            {
                "step": lambda: theirs.step(opt),
                "unscale_": lambda: theirs.unscale_(opt),
                "update": theirs.update,
            }[method]()
        assert str(info.value) == str(torch_info.value)
    # Nothing was stepped or unscaled.
    for p, before, grad in zip(model.parameters(), params, grads, strict=True):
        assert torch.equal(p.detach(), before)
        assert torch.equal(p.grad, grad)


def test_clip_grad_norm_twice_raises():
    model, opt = make()
    scaler = GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    scaler.clip_grad_norm_(opt, 1.0)
    with pytest.raises(RuntimeError, match="clip_grad_norm_"):
        scaler.clip_grad_norm_(opt, 1.0)


def test_clip_grad_norm_after_step_raises():
    model, opt = make()
    scaler = GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.clip_grad_norm_(opt, 1.0)


@pytest.mark.parametrize(
    ("max_norm", "norm_type"), [(-1.0, 2.0), (NAN, 2.0), (1.0, 0.0), (1.0, -2.0), (1.0, NAN)]
)
def test_clip_grad_norm_bad_arguments(max_norm, norm_type):
    model, opt = make()
    scaler = GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    with pytest.raises(ValueError, match="max_norm" if norm_type > 0 else "norm_type"):
        scaler.clip_grad_norm_(opt, max_norm, norm_type)


def test_misuse_resets_after_update():
    # After update() the same optimizer may be unscaled and stepped again.
    model, opt = make()
    scaler = GradScaler("cpu")
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model)).backward()
        scaler.unscale_(opt)
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()


# -------------------------------------------------------------------------------- disabled


def test_disabled_scaler_is_transparent():
    model, opt = make()
    scaler = GradScaler("cpu", enabled=False)
    assert not scaler.is_enabled()
    loss = loss_of(model)
    assert scaler.scale(loss) is loss
    outputs = [loss, (loss,)]
    assert scaler.scale(outputs) is outputs
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(opt)  # no-op
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    marker = object()
    original_step = opt.step
    calls = []

    def step(*args, **kwargs):
        calls.append((args, kwargs))
        original_step()
        return marker

    opt.step = step
    assert scaler.step(opt, closure=None) is marker  # closure is fine when disabled, as torch
    assert calls == [((), {"closure": None})]
    for b, p, g in zip(before, model.parameters(), grads, strict=True):
        assert torch.equal(p.detach(), b.add(g, alpha=-0.1))  # what SGD computes
    scaler.update()
    scaler.update(new_scale=4.0)
    assert scaler.state_dict() == {}
    assert scaler.get_scale() == 1.0
    scaler.load_state_dict({"anything": 1})  # no-op, as torch
    assert scaler.state_dict() == {}
    assert torch.amp.GradScaler("cpu", enabled=False).state_dict() == scaler.state_dict()


def test_disabled_clip_grad_norm_is_torch_clip():
    model_ours, opt = make(1)
    model_torch, _ = make(1)
    loss_of(model_ours).backward()
    loss_of(model_torch).backward()
    norm_ours = GradScaler("cpu", enabled=False).clip_grad_norm_(opt, 0.05)
    norm_torch = torch.nn.utils.clip_grad_norm_(list(model_torch.parameters()), 0.05)
    assert norm_torch.item() > 0.05  # clipping bites
    assert torch.equal(norm_ours, norm_torch)
    for a, b in zip(model_ours.parameters(), model_torch.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_warns_and_disables():
    with pytest.warns(UserWarning, match="CUDA is not available") as ours_record:
        ours = GradScaler("cuda")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        theirs = torch.amp.GradScaler("cuda")
    assert not ours.is_enabled()
    assert ours.is_enabled() == theirs.is_enabled()
    assert "Disabling" in str(ours_record[0].message)
    loss = torch.ones(())
    assert ours.scale(loss) is loss
    assert ours.get_scale() == theirs.get_scale() == 1.0
    # enabled=False does not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradScaler("cuda", enabled=False)


# ---------------------------------------------------------------------------------- scale()


def _structure(value):
    """(type, children) for containers, with map objects materialised; tensors as values."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.detach().clone())
    children = [_structure(v) for v in value]
    return (type(value), children)


def _same_structure(a, b):
    if a[0] == "tensor" or b[0] == "tensor":
        return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    return a[0] is b[0] and len(a[1]) == len(b[1]) and all(map(_same_structure, a[1], b[1]))


STRUCTURES = {
    "tensor": lambda t: t[0],
    "list": lambda t: [t[0], t[1]],
    "tuple": lambda t: (t[0], t[1], t[2]),
    "nested": lambda t: [t[0], (t[1], [t[2], (t[3],)]), []],
    "tuple-of-lists": lambda t: ([t[0]], [t[1], t[2]], ()),
    "generator": lambda t: (x for x in t[:3]),
    "generator-of-lists": lambda t: ([x, x] for x in t[:2]),
    "list-of-generators": lambda t: [(x for x in t[:2]), t[3]],
    "fp16": lambda t: [t[4], (t[0],)],
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_scale_structures_match_torch(name):
    def tensors():
        gen = torch.Generator().manual_seed(0)
        ts = [torch.randn(3, generator=gen) for _ in range(4)]
        return [*ts, torch.randn(2, generator=gen).half()]

    ours = GradScaler("cpu", init_scale=3.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=3.0)
    got = _structure(ours.scale(STRUCTURES[name](tensors())))
    expected = _structure(theirs.scale(STRUCTURES[name](tensors())))
    assert _same_structure(got, expected), (got, expected)
    if name == "tensor":
        assert torch.equal(got[2], tensors()[0] * 3.0)


def test_scale_initialises_lazily_on_first_tensor():
    scaler = GradScaler("cpu", init_scale=5.0)
    out = scaler.scale(iter([]))
    assert list(out) == []
    # No tensor seen yet: still not initialised, like torch.
    with pytest.raises(ScalerUsageError):
        scaler.update()
    scaled = scaler.scale(torch.ones(2))
    assert torch.equal(scaled, torch.full((2,), 5.0))


# ------------------------------------------------------------------------------ new_scale


@pytest.mark.parametrize(
    "new_scale",
    [
        256.0,
        torch.tensor(256.0),
        torch.tensor([256.0]),
        torch.tensor([[256.0]]),
        torch.tensor(256.0).double(),
    ],
    ids=["float", "0-dim", "1-elem", "1x1", "float64"],
)
def test_update_new_scale(new_scale):
    model, opt = make()
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model)).backward()
    scaler.step(opt)
    scaler.update(new_scale=new_scale)
    assert scaler.get_scale() == 256.0
    if isinstance(new_scale, torch.Tensor):
        new_scale.fill_(3.0)  # later changes of the caller's tensor are not picked up
        assert scaler.get_scale() == 256.0
    # The next iteration scales by the new value and starts afresh (step allowed again).
    opt.zero_grad()
    loss = loss_of(model)
    assert torch.equal(scaler.scale(loss), loss * 256.0)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 256.0  # one clean step with growth_interval=2000: unchanged


def test_update_new_scale_matches_torch_with_float():
    for factory in SCALERS.values():
        scaler = factory(init_scale=8.0)
        scaler.scale(torch.ones(()))
        scaler.update(new_scale=0.125)
        assert scaler.get_scale() == 0.125


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ("abc", TypeError),
        ([2.0], TypeError),
        (True, TypeError),
        (-1.0, ValueError),
        (0.0, ValueError),
        (INF, ValueError),
        (NAN, ValueError),
        (torch.tensor([1.0, 2.0]), ValueError),
        (torch.tensor([]), ValueError),
        (torch.tensor(2.0, requires_grad=True), ValueError),
    ],
    ids=["str", "list", "bool", "negative", "zero", "inf", "nan", "2-elem", "empty", "requires_grad"],
)
def test_update_new_scale_rejects(bad, exc):
    scaler = GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    with pytest.raises(exc):
        scaler.update(new_scale=bad)
    assert scaler.get_scale() == 8.0


# ------------------------------------------------------------------------------ fp16 grads


def test_torch_refuses_fp16_grads_we_accept():
    model, opt = make(dtype=torch.float16)
    theirs = torch.amp.GradScaler("cpu")
    theirs.scale(loss_of(model)).backward()
    with pytest.raises(ValueError, match="FP16"):
        theirs.unscale_(opt)

    model, opt = make(dtype=torch.float16)
    scaler = GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model)).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    assert all(g.dtype == torch.float16 for g in scaled)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for g, p in zip(scaled, model.parameters(), strict=True):
        # The scale is a power of two: unscaling is exact (up to fp16 subnormals, not hit here).
        assert torch.equal(p.grad, (g.float() / 2.0**8).half())
    unscaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    for b, p, g in zip(before, model.parameters(), unscaled, strict=True):
        assert torch.equal(p.detach(), b.add(g, alpha=-0.1))  # what SGD computes
    assert scaler.get_scale() == 2.0**8


def test_fp16_grad_overflow_skips_and_backs_off():
    model, opt = make(dtype=torch.float16)
    scaler = GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model)).backward()
    model[0].weight.grad[0, 0] = INF
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "adamw-fused"])
def test_fp16_clip_grad_norm_large_scaled_norm(fused):
    # 1024 fp16 gradients of 1.0 scaled by 2**15: every scaled element (32768) is finite in fp16,
    # but their scaled norm (~1.05e6) is not. The true norm is sqrt(1024) = 32, below max_norm.
    param = nn.Parameter(torch.zeros(1024, dtype=torch.float16))
    # Fused variant: AdamW, not SGD. torch 2.13's CPU fused SGD leaves fp16 params untouched in its
    # vectorized chunks (only the tail updates), with or without a grad scaler. A first Adam step
    # on a gradient of 1 moves every element by -lr, like SGD here.
    if fused:
        opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.0, fused=True)
    else:
        opt = torch.optim.SGD([param], lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**15)
    scaler.scale(param.float().sum()).backward()
    assert torch.isfinite(param.grad).all()
    norm = scaler.clip_grad_norm_(opt, 1e6)
    scaler.step(opt)
    scaler.update()
    assert norm.item() == 32.0
    assert torch.equal(param.detach(), torch.full_like(param, -0.1))
    assert scaler.get_scale() == 2.0**15


# ------------------------------------------------------------------------------ host syncs


def _train_counting(opt_name, clip, steps=4, overflow_at=(2,)):
    model, opt = make(opt=opt_name)
    scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    per_step = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_of(model, step)).backward()
        if step in overflow_at:
            model[2].bias.grad[0] = INF
        with count_host_syncs() as counts:
            if clip:
                scaler.clip_grad_norm_(opt, 0.1)
            scaler.step(opt)
            scaler.update()
        per_step.append(counts)
    return scaler, per_step


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-fused"])
def test_fused_optimizer_step_never_syncs(opt_name, clip):
    scaler, per_step = _train_counting(opt_name, clip)
    assert [sum(c.values()) for c in per_step] == [0] * len(per_step), per_step
    # The flags were acted on all the same: 2 growths, 1 backoff, 1 growth.
    assert scaler.get_scale() == 2.0**10 * 2 * 2 / 2 * 2


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_plain_sgd_step_syncs_exactly_once(clip):
    scaler, per_step = _train_counting("sgd", clip)
    assert [sum(c.values()) for c in per_step] == [1] * len(per_step), per_step
    assert scaler.get_scale() == 2.0**10 * 2 * 2 / 2 * 2


def test_sync_counter_detects_torch_scaler_sync():
    # Guard for the counting above: torch's scaler reads found_inf with .item() in step().
    model, opt = make()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    with count_host_syncs() as counts:
        scaler.step(opt)
        scaler.update()
    assert counts["item"] >= 1


# -------------------------------------------------------------------------------- pickling


def test_pickle_round_trip():
    model, opt = make()
    scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=2, hysteresis=2, min_scale=1.0)
    for step, plant in enumerate([False, True, False, False, True, False, False]):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if plant:
            model[0].bias.grad[0] = NAN
        scaler.step(opt)
        scaler.update()
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.get_scale() == scaler.get_scale()
    assert clone.state_dict() == scaler.state_dict()
    assert clone.config == scaler.config
    assert clone.is_enabled()
    # Both continue identically.
    twin_model, twin_opt = make()
    twin_model.load_state_dict(model.state_dict())
    for step in range(4):
        for s, m, o in ((scaler, model, opt), (clone, twin_model, twin_opt)):
            o.zero_grad()
            s.scale(loss_of(m, 100 + step)).backward()
            if step == 1:
                m[2].weight.grad[0, 0] = INF
            s.step(o)
            s.update()
        assert clone.state_dict() == scaler.state_dict()
        assert all(
            torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True)
        )


def test_pickle_before_first_scale():
    scaler = GradScaler("cpu", init_scale=123.0)
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.get_scale() == 123.0
    assert torch.equal(clone.scale(torch.ones(())), torch.tensor(123.0))


def test_pickle_mid_iteration_refused_like_torch():
    for factory in SCALERS.values():
        model, opt = make()
        scaler = factory()
        scaler.scale(loss_of(model)).backward()
        scaler.unscale_(opt)
        with pytest.raises(AssertionError, match="may only be pickled at the beginning"):
            pickle.dumps(scaler)


# --------------------------------------------------------------------------------- kernels


def _grads(dtype, plant=None):
    gen = torch.Generator().manual_seed(7)

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 300).to(dtype)

    out = [
        r(5, 7),
        r(6, 4).t(),  # transposed
        r(0),  # empty
        r(10)[::2],  # strided
        r(3, 3, 3).permute(2, 0, 1),
        r(4, 6)[:, 1:5],  # sliced rows
    ]
    if plant is not None:
        out[4][1, 2, 0] = plant
    return out


@pytest.mark.parametrize("plant", [None, INF, -INF, NAN], ids=["finite", "inf", "-inf", "nan"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_reference_kernel_matches_torch_kernel(dtype, plant):
    results = {}
    for kernel in ("torch", "reference", "auto"):
        grads = _grads(dtype, plant)
        assert not all(g.is_contiguous() for g in grads)
        found_inf = torch.zeros(())
        kernels.check_(
            grads, found_inf, torch.tensor(1 / 3.0), backend=kernels.backend(kernel, grads[0].device, dtype)
        )
        results[kernel] = (found_inf, grads)
    for kernel in ("reference", "auto"):
        found_inf, grads = results[kernel]
        assert torch.equal(found_inf, results["torch"][0])
        for a, b in zip(grads, results["torch"][1], strict=True):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(a, b) or (plant is not None and torch.equal(a.nan_to_num(), b.nan_to_num()))
    assert results["torch"][0].item() == (0.0 if plant is None else 1.0)
    # Independent check of the values: an elementwise float32 multiply rounded to dtype.
    for got, original in zip(results["reference"][1], _grads(dtype, plant), strict=True):
        expected = (original.float() * torch.tensor(1 / 3.0)).to(dtype)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_check_only_leaves_grads_unchanged(dtype):
    for kernel in ("torch", "reference"):
        grads = _grads(dtype, INF)
        originals = [g.clone() for g in grads]
        found_inf = torch.zeros(())
        kernels.check_(
            grads, found_inf, None, backend=kernels.backend(kernel, grads[0].device, grads[0].dtype)
        )
        assert found_inf.item() == 1.0
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(grads, originals, strict=True))


@pytest.mark.parametrize("plant", [None, INF, NAN], ids=["finite", "inf", "nan"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_scaler_kernel_choice_gives_same_results(dtype, plant):
    results = {}
    for kernel in ("torch", "reference"):
        params = [nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in _grads(dtype)]
        for p, g in zip(params, _grads(dtype, plant), strict=True):
            p.grad = g  # non-contiguous grads are allowed
        opt = torch.optim.SGD(params, lr=1.0)
        scaler = GradScaler("cpu", init_scale=3.0, growth_interval=1, kernel=kernel)
        scaler.scale(torch.ones(()))
        scaler.unscale_(opt)
        grads = [p.grad.clone() for p in params]
        scaler.step(opt)
        scaler.update()
        results[kernel] = (scaler.get_scale(), grads, [p.detach().clone() for p in params])
    assert results["torch"][0] == results["reference"][0] == (1.5 if plant is not None else 6.0)
    for a, b in zip(results["torch"][1], results["reference"][1], strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    for a, b in zip(results["torch"][2], results["reference"][2], strict=True):
        assert torch.equal(a, b)


def test_clip_with_infinite_max_norm_returns_the_norm_and_leaves_grads():
    model, opt = make()
    scaler = GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model, 0)).backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) / 2.0**8
    norm = scaler.clip_grad_norm_(opt, float("inf"))
    assert torch.allclose(norm, want, rtol=1e-6)
    unscaled = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in unscaled)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            GradScaler("cpu").clip_grad_norm_(opt, bad)


def test_new_scale_outside_bounds_is_rejected():
    model, opt = make()
    scaler = GradScaler("cpu", init_scale=8.0, min_scale=4.0, max_scale=16.0)
    scaler.scale(loss_of(model, 0)).backward()
    scaler.step(opt)
    with pytest.raises(ValueError, match=r"new_scale .*\[min_scale, max_scale\]"):
        scaler.update(new_scale=2.0)


def test_grad_change_detection_sees_writes_new_tensors_and_none():
    from distscale.overflow import GradSet

    model, opt = make()
    loss_of(model, 0).backward()
    grads = GradSet(opt, kernel="torch")
    assert grads.unchanged_since(opt)
    grads.check_(torch.zeros(()), torch.tensor(0.5))  # our own write is recorded
    assert grads.unchanged_since(opt)
    first = next(p for p in model.parameters())
    first.grad.add_(1.0)  # another backward accumulating, say
    assert not grads.unchanged_since(opt)
    grads.refresh_versions()
    first.grad = first.grad.clone()  # a new tensor object
    assert not grads.unchanged_since(opt)
    grads = GradSet(opt)
    first.grad = None  # zero_grad(set_to_none=True) on part of the model
    assert not grads.unchanged_since(opt)


def test_param_group_added_mid_training_is_checked():
    """The per-optimizer parameter classification is cached; a new param group must invalidate it."""
    model, opt = make()
    extra = torch.nn.Parameter(torch.ones(3))
    scaler = GradScaler("cpu", init_scale=2.0**10)
    for step in range(2):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    opt.add_param_group({"params": [extra]})
    opt.zero_grad()
    scaler.scale(loss_of(model, 2) + extra.sum()).backward()
    extra.grad[1] = INF
    scaler.step(opt)
    scaler.update()
    assert scaler.last_step_skipped() and scaler.get_scale() == 2.0**9
    assert torch.equal(extra.detach(), torch.ones(3))


# ---------------------------------------------------------------------------- on_min_scale


def _min_scale_run(on_min_scale, overflows):
    """init 4, min 2, backoff 0.5: the 1st overflow backs off 4 -> 2 (no event), later ones find
    the scale at the floor (an event each)."""
    scaler = GradScaler("cpu", init_scale=4.0, min_scale=2.0, on_min_scale=on_min_scale)
    model, opt = tiny.make()
    return (
        scaler,
        model,
        opt,
        [lambda i=i: tiny.one_step(scaler, model, opt, i, overflow=True) for i in range(overflows)],
    )


def test_on_min_scale_raise():
    scaler, _, _, steps = _min_scale_run("raise", 2)
    assert steps[0]() == 2.0  # backoff to the floor: no event yet
    with pytest.raises(MinScaleError, match="min_scale") as info:
        steps[1]()
    assert isinstance(info.value, RuntimeError)
    assert scaler.get_scale() == 2.0
    assert scaler.state_dict()["state"]["num_min_scale_events"] == 1


def test_on_min_scale_raise_not_on_clean_steps_at_floor():
    scaler = GradScaler("cpu", init_scale=2.0, min_scale=2.0, on_min_scale="raise", growth_interval=1000)
    model, opt = tiny.make()
    for step in range(3):
        assert tiny.one_step(scaler, model, opt, step) == 2.0  # at the floor, but no overflow: silent


def test_training_can_continue_after_min_scale_error():
    scaler, model, opt, steps = _min_scale_run("raise", 2)
    steps[0]()
    with pytest.raises(MinScaleError):
        steps[1]()
    num_updates = scaler.state_dict()["state"]["num_updates"]
    tiny.one_step(scaler, model, opt, 10)  # a clean step after the error
    assert scaler.state_dict()["state"]["num_updates"] == num_updates + 1


def test_on_min_scale_warn():
    scaler, _, _, steps = _min_scale_run("warn", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert steps[0]() == 2.0
    with pytest.warns(RuntimeWarning, match="min_scale"):
        assert steps[1]() == 2.0
    with pytest.warns(RuntimeWarning, match="min_scale"):  # every event warns
        assert steps[2]() == 2.0
    assert scaler.state_dict()["state"]["num_min_scale_events"] == 2


def test_on_min_scale_clamp_is_silent():
    scaler, _, _, steps = _min_scale_run("clamp", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scales = [step() for step in steps]
    assert scales == [2.0, 2.0, 2.0, 2.0]
    state = scaler.state_dict()["state"]
    assert state["num_min_scale_events"] == 3
    assert state["num_skipped"] == 4
    assert math.isclose(scaler.get_scale(), 2.0)
