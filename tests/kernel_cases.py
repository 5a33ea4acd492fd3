"""Cases shared by the kernel tests: gradient layouts, planted values, the float64 reference, and
the checks every backend must pass (values and ``found_inf`` bitwise the reference's and torch's
op's; norms within a relative 1e-5 of float64). Run in process on the GPU tier and under Triton's
interpreter in ``tests/interpreted`` (a subprocess started by ``tests/test_kernels.py``)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distscale import GradScaler, kernels
from distscale.kernels import reference

INF = float("inf")


NAN = float("nan")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


INV = 1 / 3.0  # not a power of two: the product rounds, so the cast back is exercised


REL = 1e-5


Layout = tuple[list[torch.Tensor], list[int] | None, int | None]  # tensors, norm_numels, block


def check_group(
    grads: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | None,
    norm_type: float | None = None,
    kernel: str = "auto",
    norm_numels: list[int] | None = None,
) -> torch.Tensor | None:
    """``kernels.check_`` on the backend ``kernel`` resolves to for this group."""
    device, dtype = (grads[0].device, grads[0].dtype) if grads else (torch.device("cpu"), torch.float32)
    backend = kernels.backend(kernel, device, dtype)
    return kernels.check_(grads, found_inf, inv_scale, norm_type, backend=backend, norm_numels=norm_numels)


def layout(name: str, dtype: torch.dtype, seed: int = 0) -> Layout:
    """Gradient lists by name: (tensors, norm_numels, block)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 8).to(dtype)

    if name == "sizes":  # 0, 1, odd, 2^k +- 1, several blocks of 512
        return [randn(n) for n in (0, 1, 7, 511, 513, 1024, 1025, 2049)], None, 512
    if name == "single":
        return [randn(1)], None, None
    if name == "empty":
        return [randn(0), randn(0, 3)], None, None
    if name == "strided":  # dense permuted, gapped (staged), channels_last, misaligned start
        gapped = randn(40, 30)[:, ::3]
        misaligned = randn(301)[1:]
        channels_last = randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
        # The transposed tensor counts a prefix: row-major order is not memory order, so it is staged.
        return [randn(33, 17).t(), gapped, channels_last, misaligned], [500, 100, 210, 300], 256
    if name == "flat":  # views tiling one buffer from a misaligned offset; FSDP-like counted prefixes
        flat = randn(4100)
        views = [flat[1:1001].view(10, 100), flat[1001:1002], flat[1002:3001], flat[3001:4100]]
        return views, [1000, 0, 1999, 1000], 1024
    if name == "prefix":  # counted prefixes, none, all: the norm ignores the rest, the check does not
        return [randn(700), randn(300), randn(1500)], [350, 0, 1500], 512
    raise AssertionError(name)


LAYOUTS = ("sizes", "single", "empty", "strided", "flat", "prefix")


MODES = [(unscale, norm) for unscale in (True, False) for norm in (None, 2.0, INF)]


PLANTS = [("first", INF), ("last", -INF), ("last", NAN), ("first", NAN)]


def plant(tensors: list[torch.Tensor], where: str, value: float) -> None:
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return
    target = nonempty[0] if where == "first" else nonempty[-1]
    index = (0,) * target.dim() if where == "first" else tuple(s - 1 for s in target.shape)
    target[index] = value


def reference_norm(tensors: list[torch.Tensor], counts: list[int] | None, norm_type: float) -> float:
    parts = [
        t.reshape(-1)[: t.numel() if counts is None else counts[i]].double() for i, t in enumerate(tensors)
    ]
    flat = torch.cat([p for p in parts if p.numel()] or [torch.zeros(0, dtype=torch.float64)])
    if flat.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(flat, norm_type))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN payloads aside (they differ between numpy, CPUs and GPUs, not between runs)."""
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return torch.equal(a.view(INT_VIEW[a.dtype])[keep], b.view(INT_VIEW[b.dtype])[keep])


def norm_ok(got: float, want: float) -> bool:
    if math.isnan(want) or math.isinf(want):
        return (math.isnan(want) and math.isnan(got)) or got == want
    return abs(got - want) <= REL * max(abs(want), 1e-30)


def check_case(
    tensors: list[torch.Tensor],
    counts: list[int] | None,
    block: int | None,
    unscale: bool,
    norm_type: float | None,
    run: Callable[..., torch.Tensor | None],
) -> str | None:
    """Run ``run`` (the fused kernel) on ``tensors`` and compare with the reference; None if ok."""
    device = tensors[0].device
    before = [t.clone() for t in tensors]
    ref = [t.clone() for t in tensors]
    ref_found = torch.zeros((), device=device)
    inv = torch.tensor(INV, device=device) if unscale else None
    reference.check_and_unscale_(ref, ref_found, inv)
    found = torch.zeros((), device=device)
    norm = run(tensors, found, inv, norm_type, norm_numels=counts, block=block)
    problems = []
    if not torch.equal(found, ref_found):
        problems.append(f"found_inf {found.item()} != {ref_found.item()}")
    if unscale:
        bad = [i for i, (t, r) in enumerate(zip(tensors, ref, strict=True)) if not bits_equal(t, r)]
        if bad:
            problems.append(f"unscaled values differ from the reference in tensors {bad}")
        if device.type == "cpu" or tensors[0].dtype != torch.bfloat16:
            op = [t.clone() for t in before]
            op_found = torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(op, op_found, inv)
            if not all(bits_equal(t, o) for t, o in zip(tensors, op, strict=True)):
                problems.append(
                    "unscaled values differ from torch._amp_foreach_non_finite_check_and_unscale_"
                )
    elif not all(bits_equal(t, b) for t, b in zip(tensors, before, strict=True)):
        problems.append("read-only mode wrote to the grads")
    if norm_type is None:
        if norm is not None:
            problems.append("a norm was returned without norm_type")
    else:
        want = reference_norm(before, counts, norm_type)
        if norm is None or norm.dtype != torch.float32 or norm.dim() != 0:
            problems.append(f"norm is not a 0-dim float32 tensor: {norm!r}")
        elif not norm_ok(float(norm), want):
            problems.append(f"norm {float(norm)!r} != {want!r} (rel {REL})")
    return "; ".join(problems) or None


def numeric_cases() -> dict[str, dict[str, Any]]:
    """name -> spec: every dtype x layout x mode on clean grads, and planted values in two modes."""
    cases: dict[str, dict[str, Any]] = {}
    for dname in DTYPES:
        for lay in LAYOUTS:
            for unscale, norm in MODES:
                spec = {"dtype": dname, "layout": lay, "unscale": unscale, "norm": norm, "plant": None}
                cases[f"{dname}-{lay}-{'unscale' if unscale else 'read'}-norm{norm}"] = spec
            for where, value in PLANTS:
                for unscale, norm in ((True, 2.0), (False, INF)):
                    spec = {
                        "dtype": dname,
                        "layout": lay,
                        "unscale": unscale,
                        "norm": norm,
                        "plant": (where, value),
                    }
                    mode = "unscale" if unscale else "read"
                    cases[f"{dname}-{lay}-{mode}-norm{norm}-{value}@{where}"] = spec
    return cases


NUMERIC_CASES = numeric_cases()


def train_scaler(kernel: str, opt: str, clip: bool, steps: int = 8) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=2, kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for step in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale((out.float() - y).pow(2).mean()).backward()
        if step in (2, 5):
            with torch.no_grad():
                next(model.parameters()).grad.view(-1)[-1] = INF if step == 2 else NAN
        if clip:
            scaler.clip_grad_norm_(optimizer, 0.5)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        optimizer.zero_grad()
    return scales, [p.detach().clone() for p in model.parameters()]


def gradset_optimizer() -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in ((300, torch.float32), (77, torch.float16))]
    params.append(nn.Parameter(torch.zeros(5, 9, dtype=torch.bfloat16)))
    flat = nn.Parameter(torch.zeros(1000))  # an FSDP1 FlatParameter shard with 10 padding elements
    flat._unpadded_unsharded_size = torch.Size([3990])  # type: ignore[attr-defined]
    flat._sharded_size = torch.Size([1000])  # type: ignore[attr-defined]
    flat._padded_unsharded_size = torch.Size([4000])  # type: ignore[attr-defined]  # over 4 ranks
    flat._shard_numel_padded = 10  # type: ignore[attr-defined]
    params.append(flat)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 100).to(p.dtype)
    flat.grad[-10:] = 1e4  # padding: checked, never counted
    return torch.optim.SGD(params, lr=0.1)


# ---------------------------------------------------------------------------- the fused update


def rule_configs() -> dict[str, Any]:
    from distscale.config import ScalerConfig

    return {
        "torch-defaults": ScalerConfig(),
        "hysteresis": ScalerConfig(init_scale=2.0**10, growth_interval=3, hysteresis=2),
        "deepspeed-like": ScalerConfig(
            init_scale=2.0**10, growth_interval=2, hysteresis=3, hysteresis_refill="clean_step",
            growth_delay=1, min_scale=1.0, max_scale=2.0**12,
        ),
        "fairseq-like": ScalerConfig(
            init_scale=8.0, growth_interval=2, min_scale=1.0, min_scale_rule="refuse", tolerance=0.25,
            growth_factor=1.5, backoff_factor=0.7,
        ),
        "min-floor-odd-bounds": ScalerConfig(
            init_scale=16.0, growth_interval=1, min_scale=0.3, max_scale=100.0, backoff_factor=0.3,
        ),
        "near-float32-max": ScalerConfig(init_scale=3.0e38, growth_interval=1),
        "amax": ScalerConfig(rule="amax", init_scale=2.0**16, growth_interval=3),
        "amax-bounded-hysteresis": ScalerConfig(
            rule="amax", amax_margin=16.0, growth_interval=1, hysteresis=2, min_scale=1.0, max_scale=2.0**24,
            init_scale=2.0**20,
        ),
    }  # fmt: skip


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.is_floating_point() and bool(torch.isnan(a)) and bool(torch.isnan(b))
    return a.dtype == b.dtype and (nan or torch.equal(a, b))


def rule_sequence(config: Any, seed: int, steps: int = 300) -> str | None:
    """The fused update against ``policy.update`` + ``stats.update_stats`` over ``steps`` random
    steps (overflows, norms, underflow readings, several optimizers): the first difference, or None."""
    from distscale import policy, stats
    from distscale.kernels import update_triton

    rng = random.Random(seed)
    ref_state, ref_stats = policy.init_state(config), stats.init_stats()
    state, st = policy.init_state(config), stats.init_stats()
    for step in range(steps):
        found = torch.tensor(1.0 if rng.random() < 0.35 else 0.0)
        kw: dict[str, Any] = {}
        if rng.random() < 0.5:
            kw["grad_norm"] = torch.tensor(rng.random() * 10, dtype=torch.float32)
        if rng.random() < 0.3:
            kw["underflow"] = (torch.tensor(rng.random(), dtype=torch.float64), torch.tensor(1e-3))
        if rng.random() < 0.5:
            kw["overflows"] = torch.tensor(int(found) * rng.randint(1, 3))
        if rng.random() < 0.8:  # the step's largest |scaled gradient|: from tiny to overflowing
            choice = rng.random()
            value = float(state.scale) * 10 ** rng.uniform(-9, -1)
            kw["amax"] = torch.tensor(
                0.0 if choice < 0.05 else float("nan") if choice < 0.1 else 1e6 if choice < 0.15 else value
            )
        new_state = policy.update(ref_state, found, config, kw.get("amax"))
        outcome = stats.StepOutcome(found, **kw)
        ref_stats = stats.update_stats(ref_stats, outcome, ref_state, new_state, config)
        ref_state = new_state
        update_triton.update_(state, st, found, config, **kw)
        names = (*policy.ScaleState._fields, *stats.ScalerStats._fields)
        for a, b, field in zip((*ref_state, *ref_stats), (*state, *st), names, strict=True):
            if not same_value(a, b):
                return f"step {step}: {field} torch {a} kernel {b}"
    return None


def scaler_run(kernel: str, device: str) -> dict[str, Any]:
    """A short fp32 run, inf/NaN planted; the scaler's state and metrics per step. No clipping: the
    fused norm is not bitwise torch's, and this compares the update, not the norm."""
    import distscale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler(
        device, init_scale=2.0**8, growth_interval=2, hysteresis=2, min_scale=1.0, kernel=kernel,
        underflow_every=3,
    )  # fmt: skip
    plants = {1: float("inf"), 2: float("nan"), 5: float("inf")}
    records = []
    for step in range(8):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 8, generator=gen).to(device)).pow(2).mean()).backward()
        if step in plants:
            model[0].weight.grad.view(-1)[0] = plants[step]
        scaler.step(opt)
        scaler.update()
        records.append(scaler.metrics())
    params = [p.detach().cpu().tolist() for p in model.parameters()]
    return {"records": records, "params": params, "state": scaler.state_dict()}
