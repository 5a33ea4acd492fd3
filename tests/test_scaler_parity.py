"""Single-process parity with torch.amp.GradScaler: same scales, same parameters, bit for bit.

Two identical models are trained side by side, one with ``distscale.GradScaler`` and one with
``torch.amp.GradScaler``, on the same batches, with fp16 autocast on CPU and inf/NaN planted into
gradients on some steps. After every ``update()`` the scales must be equal, and after every step
the parameters must be ``torch.equal``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import distscale

INF = float("inf")
NAN = float("nan")
STEPS = 40
MAX_NORM = 0.5

# step -> (parameter index, value planted into that parameter's .grad after backward)
PLANTS = {
    3: (0, INF),
    8: (3, NAN),
    9: (1, -INF),
    16: (2, INF),
    23: (0, NAN),
    30: (3, INF),
    31: (1, INF),
    37: (2, NAN),
}

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "sgd-fused-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
}

SCALER_ARGS = {
    "defaults": {},
    "fast": {"init_scale": 2.0**10, "growth_interval": 3},
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(steps: int):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        # Large targets give large fp16 gradients, so a growing scale overflows naturally too.
        yield torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen) * 2


def forward_backward(scaler, model, x, y, step, plants):
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    assert out.dtype == torch.float16
    loss = (out.float() - y).pow(2).mean()
    scaler.scale(loss).backward()
    if step in plants:
        index, value = plants[step]
        with torch.no_grad():
            list(model.parameters())[index].grad.view(-1)[0] = value


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def train(scaler, model, opt, *, clip, norm_type=2.0, plants=PLANTS, steps=STEPS):
    """clip: None; "torch" (unscale_ + torch.nn.utils.clip_grad_norm_, whatever the scaler);
    "ours" (distscale's scaler.clip_grad_norm_; the torch scaler runs the torch chain instead)."""
    params = list(model.parameters())
    trace = []
    for step, (x, y) in enumerate(batches(steps)):
        opt.zero_grad(set_to_none=True)
        forward_backward(scaler, model, x, y, step, plants)
        norm = None
        if clip == "ours" and isinstance(scaler, distscale.GradScaler):
            norm = scaler.clip_grad_norm_(opt, MAX_NORM, norm_type)
        elif clip is not None:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type)
        scaler.step(opt)
        scaler.update()
        trace.append((scaler.get_scale(), snapshot(model), None if norm is None else norm.detach().clone()))
    return trace


def same_norm(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.isnan(a).item() or torch.isnan(b).item():
        return bool(torch.isnan(a).item() and torch.isnan(b).item())
    return torch.equal(a, b)


def close_norm(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (torch.isfinite(a).item() and torch.isfinite(b).item()):
        return bool(
            torch.isnan(a).item() == torch.isnan(b).item() and torch.isinf(a).item() == torch.isinf(b).item()
        )
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def assert_scale_history_is_eventful(scales, init_scale):
    # Step 0 must not be skipped: torch's fused SGD creates its momentum buffers with
    # torch.empty_like and leaves them uninitialised when its very first step is skipped
    # (found_inf=1), so both runs would then read garbage memory (a torch bug, not distscale's).
    assert scales[0] >= init_scale, "the first step was skipped; choose gentler data"
    history = [init_scale, *scales]
    grew = any(b > a for a, b in itertools.pairwise(history))
    shrank = any(b < a for a, b in itertools.pairwise(history))
    assert shrank, "no backoff happened: the test would not test skipping"
    return grew


def run_pair(opt_name, scaler_args, clip, norm_type=2.0, plants=PLANTS):
    model_ours, model_torch = make_model(), make_model()
    for a, b in zip(model_ours.parameters(), model_torch.parameters(), strict=True):
        assert torch.equal(a, b)
    ours = distscale.GradScaler("cpu", **scaler_args)
    theirs = torch.amp.GradScaler("cpu", **scaler_args)
    trace_ours = train(
        ours,
        model_ours,
        OPTIMIZERS[opt_name](model_ours.parameters()),
        clip=clip,
        norm_type=norm_type,
        plants=plants,
    )
    trace_torch = train(
        theirs,
        model_torch,
        OPTIMIZERS[opt_name](model_torch.parameters()),
        clip=clip,
        norm_type=norm_type,
        plants=plants,
    )
    return trace_ours, trace_torch


@pytest.mark.parametrize("scaler_args", list(SCALER_ARGS), ids=list(SCALER_ARGS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, "torch"], ids=["noclip", "torch-clip"])
def test_bitwise_parity(opt_name, scaler_args, clip):
    args = SCALER_ARGS[scaler_args]
    trace_ours, trace_torch = run_pair(opt_name, args, clip)
    for step, ((s_ours, p_ours, n_ours), (s_torch, p_torch, n_torch)) in enumerate(
        zip(trace_ours, trace_torch, strict=True)
    ):
        assert s_ours == s_torch, f"scale differs after update {step}: {s_ours} vs {s_torch}"
        for i, (a, b) in enumerate(zip(p_ours, p_torch, strict=True)):
            assert torch.equal(a, b), f"param {i} differs after step {step}"
        if clip is not None:
            assert same_norm(n_ours, n_torch), step
    grew = assert_scale_history_is_eventful([t[0] for t in trace_torch], args.get("init_scale", 2.0**16))
    if scaler_args == "fast":
        assert grew, "no growth happened"
    # Skipped steps really skipped: parameters unchanged across each planted step.
    for step in PLANTS:
        before = trace_torch[step - 1][1] if step else None
        if before is not None:
            assert all(torch.equal(a, b) for a, b in zip(before, trace_torch[step][1], strict=True))


def lockstep_our_clip(opt_name, scaler_args, norm_type, resync):
    """distscale's clip_grad_norm_ next to torch's unscale_ + clip_grad_norm_, one step at a time.

    With ``resync``, torch's model and optimizer state are overwritten with ours after every
    step, so each step starts from identical parameters and only that step's rounding is
    compared (see the fused branch of the test for why).
    """
    model_ours, model_torch = make_model(), make_model()
    opt_ours = OPTIMIZERS[opt_name](model_ours.parameters())
    opt_torch = OPTIMIZERS[opt_name](model_torch.parameters())
    ours = distscale.GradScaler("cpu", **scaler_args)
    theirs = torch.amp.GradScaler("cpu", **scaler_args)
    params_torch = list(model_torch.parameters())
    for step, (x, y) in enumerate(batches(STEPS)):
        for opt in (opt_ours, opt_torch):
            opt.zero_grad(set_to_none=True)
        forward_backward(ours, model_ours, x, y, step, PLANTS)
        forward_backward(theirs, model_torch, x, y, step, PLANTS)
        norm_ours = ours.clip_grad_norm_(opt_ours, MAX_NORM, norm_type)
        theirs.unscale_(opt_torch)
        norm_torch = torch.nn.utils.clip_grad_norm_(params_torch, MAX_NORM, norm_type)
        ours.step(opt_ours)
        theirs.step(opt_torch)
        ours.update()
        theirs.update()
        yield (
            step,
            (ours.get_scale(), snapshot(model_ours), norm_ours.detach().clone()),
            (theirs.get_scale(), snapshot(model_torch), norm_torch.detach().clone()),
        )
        if resync:
            with torch.no_grad():
                for p_ours, p_torch in zip(model_ours.parameters(), params_torch, strict=True):
                    p_torch.copy_(p_ours)
                    for key, value in opt_ours.state[p_ours].items():
                        if isinstance(value, torch.Tensor):
                            opt_torch.state[p_torch][key].copy_(value)


@pytest.mark.parametrize("scaler_args", list(SCALER_ARGS), ids=list(SCALER_ARGS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "linf"])
def test_our_clip_matches_torch_unscale_and_clip(opt_name, scaler_args, norm_type):
    args = SCALER_ARGS[scaler_args]
    fused = "fused" in opt_name
    clipped = 0
    scales = []
    for step, (s_ours, p_ours, n_ours), (s_torch, p_torch, n_torch) in lockstep_our_clip(
        opt_name, args, norm_type, resync=fused
    ):
        assert s_ours == s_torch, f"scale differs after update {step}: {s_ours} vs {s_torch}"
        assert n_ours.dtype == n_torch.dtype == torch.float32
        if not fused:
            # Non-fused: unscale in place, then the same per-tensor norms, the same coefficient and
            # the same foreach multiply as torch.nn.utils.clip_grad_norm_: bit for bit.
            assert same_norm(n_ours, n_torch), (step, n_ours, n_torch)
            for i, (a, b) in enumerate(zip(p_ours, p_torch, strict=True)):
                assert torch.equal(a, b), f"param {i} differs after step {step}"
        else:
            # Fused: the grads stay scaled; the norm is that of the scaled grads times inv_scale,
            # and the clip coefficient is folded into grad_scale (grad / (scale / coef) inside the
            # fused kernel instead of grad * inv_scale * coef in place). Same math, different
            # rounding: equal to float32 precision, not bitwise. Left to run freely, these last-bit
            # differences are amplified across steps (a flipped fp16 rounding in the autocast
            # forward is a 1e-3 relative change, and Adam divides by sqrt(v)), so the torch run is
            # resynchronised to ours after each step and each step is compared on its own. The
            # skip decisions, and so the scales, are still identical bitwise.
            assert close_norm(n_ours, n_torch), (step, n_ours, n_torch)
            for i, (a, b) in enumerate(zip(p_ours, p_torch, strict=True)):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"param {i} differs after step {step}"
        if torch.isfinite(n_torch).item() and n_torch.item() > MAX_NORM:
            clipped += 1
        scales.append(s_torch)
    assert clipped > 0, "max_norm never bit: the test would not test clipping"
    grew = assert_scale_history_is_eventful(scales, args.get("init_scale", 2.0**16))
    if scaler_args == "fast":
        assert grew, "no growth happened"


def test_clip_norm_is_torch_norm_of_unscaled_grads():
    # One step, no clipping effect (huge max_norm): the returned norm is exactly torch's norm of
    # the unscaled gradients, and the gradients are exactly torch's unscaled gradients.
    for norm_type in (1.0, 2.0, 3.5, INF):
        model_ours, model_torch = make_model(1), make_model(1)
        ours, theirs = (
            distscale.GradScaler("cpu", init_scale=2.0**12),
            torch.amp.GradScaler("cpu", init_scale=2.0**12),
        )
        opt_ours = torch.optim.SGD(model_ours.parameters(), lr=0.1)
        opt_torch = torch.optim.SGD(model_torch.parameters(), lr=0.1)
        x, y = next(batches(1))
        forward_backward(ours, model_ours, x, y, 0, {})
        forward_backward(theirs, model_torch, x, y, 0, {})
        norm_ours = ours.clip_grad_norm_(opt_ours, 1e9, norm_type)
        theirs.unscale_(opt_torch)
        norm_torch = torch.nn.utils.clip_grad_norm_(list(model_torch.parameters()), 1e9, norm_type)
        assert torch.equal(norm_ours, norm_torch), (norm_type, norm_ours, norm_torch)
        for a, b in zip(model_ours.parameters(), model_torch.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
        # Independent check of the value: the norm of all unscaled grads concatenated.
        flat = torch.cat([p.grad.reshape(-1) for p in model_torch.parameters()])
        assert math.isclose(norm_ours.item(), torch.linalg.vector_norm(flat, norm_type).item(), rel_tol=1e-5)


@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-fused-momentum"])
def test_fused_clip_norm_close_to_torch(opt_name):
    model_ours, model_torch = make_model(2), make_model(2)
    ours, theirs = distscale.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    opt_ours = OPTIMIZERS[opt_name](model_ours.parameters())
    x, y = next(batches(1))
    forward_backward(ours, model_ours, x, y, 0, {})
    forward_backward(theirs, model_torch, x, y, 0, {})
    scaled = [p.grad.clone() for p in model_ours.parameters()]
    norm_ours = ours.clip_grad_norm_(opt_ours, 1e9)
    # Fused optimizers: the grads are only read, never unscaled in place.
    for a, p in zip(scaled, model_ours.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    theirs.unscale_(OPTIMIZERS[opt_name](model_torch.parameters()))
    norm_torch = torch.nn.utils.clip_grad_norm_(list(model_torch.parameters()), 1e9)
    assert torch.allclose(norm_ours, norm_torch, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------ several optimizers

MULTI = {
    "sgd+sgd": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05),
    ),
    "sgd+adamw-fused": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    ),
    "adamw-fused+sgd-fused": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.05, fused=True, momentum=0.9),
    ),
}

# Infs only in the first half (parameters 0 and 1 belong to the first optimizer).
MULTI_PLANTS = {2: (0, INF), 7: (1, NAN), 8: (0, INF), 15: (1, -INF), 22: (0, INF)}


def train_two(scaler, model, make_a, make_b, *, clip):
    params = list(model.parameters())
    first, second = params[:2], params[2:]
    opt_a, opt_b = make_a(first), make_b(second)
    trace = []
    for step, (x, y) in enumerate(batches(30)):
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        forward_backward(scaler, model, x, y, step, MULTI_PLANTS)
        if clip in ("first", "both"):
            scaler.unscale_(opt_a)
            torch.nn.utils.clip_grad_norm_(first, MAX_NORM)
        if clip == "both":
            # Both optimizers checked before the first step(): their flags travel together, and
            # each step must still act on its own optimizer's flag only.
            scaler.unscale_(opt_b)
            torch.nn.utils.clip_grad_norm_(second, MAX_NORM)
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        trace.append((scaler.get_scale(), snapshot(model)))
    return trace


@pytest.mark.parametrize("clip", [None, "first", "both"], ids=["noclip", "clip-first", "clip-both"])
@pytest.mark.parametrize("pair", list(MULTI))
def test_two_optimizers_bitwise(pair, clip):
    make_a, make_b = MULTI[pair]
    args = {"init_scale": 2.0**10, "growth_interval": 3}
    trace_ours = train_two(distscale.GradScaler("cpu", **args), make_model(3), make_a, make_b, clip=clip)
    trace_torch = train_two(torch.amp.GradScaler("cpu", **args), make_model(3), make_a, make_b, clip=clip)
    for step, ((s_ours, p_ours), (s_torch, p_torch)) in enumerate(zip(trace_ours, trace_torch, strict=True)):
        assert s_ours == s_torch, f"scale differs after update {step}"
        for i, (a, b) in enumerate(zip(p_ours, p_torch, strict=True)):
            assert torch.equal(a, b), f"param {i} differs after step {step}"
    # Per-optimizer skip decisions: on a planted step the first half stays, the second half moves.
    for step in MULTI_PLANTS:
        before, after = trace_torch[step - 1][1], trace_torch[step][1]
        assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2], strict=True)), step
        assert not all(torch.equal(a, b) for a, b in zip(before[2:], after[2:], strict=True)), step
        assert trace_torch[step][0] < trace_torch[step - 1][0]
