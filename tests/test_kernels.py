"""The fused Triton check (distscale.kernels.triton_ops) against the reference backend, and selection.

Three tiers:

* Interpreter (CPU): Triton decides between its interpreter and its compiler when a kernel is
  decorated, and another test may already have imported the kernel compiled. So the kernel runs
  in a subprocess started with ``TRITON_INTERPRET=1`` (this file run as a script), which checks
  every case and reports JSON; each case is one pytest test here.
* In process (CPU): selection, error messages, "auto" on the CPU is exactly torch's op.
* GPU (marker ``gpu``, skipped without CUDA): dtype x size x tensor count x planted value, no host
  sync during a full scaler step with a fused optimizer, CUDA-graph capture of a training step.

Values and ``found_inf`` must be bitwise equal to the reference (and to torch's op); norms within
a relative 1e-5 of a float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distscale import GradScaler, kernels
from distscale.kernels import _table, reference

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")
NAN = float("nan")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
INV = 1 / 3.0  # not a power of two: the product rounds, so the cast back is exercised
REL = 1e-5

# ----------------------------------------------------------------------------- shared case logic

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
SPECIAL_CASES = (
    "select-auto-cpu-is-torch",
    "select-triton-cpu-interpreted",
    "select-bad-dtype",
    "fallback-norm-type-1",
    "cache-reuse",
    "flat-spans-merged",
    "scaler-triton-vs-torch",
    "scaler-clip-one-pass",
    "gradset-fused-norm",
)
CASE_NAMES = [*NUMERIC_CASES, *SPECIAL_CASES]

# ------------------------------------------------------------------ the interpreter subprocess side


def _run_numeric(name: str) -> str | None:
    from distscale.kernels import triton_ops

    spec = NUMERIC_CASES[name]
    tensors, counts, block = layout(spec["layout"], DTYPES[spec["dtype"]])
    if spec["plant"] is not None:
        plant(tensors, *spec["plant"])
    return check_case(tensors, counts, block, spec["unscale"], spec["norm"], triton_ops.fused_check_)


def _train(kernel: str, opt: str, clip: bool, steps: int = 8) -> tuple[list[float], list[torch.Tensor]]:
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


def _run_special(name: str) -> str | None:
    from distscale.kernels import triton_ops

    cpu = torch.device("cpu")
    if name == "select-auto-cpu-is-torch":
        if kernels.backend("auto", cpu, torch.float16) != "torch":
            return "auto on the CPU did not pick torch"
        grads = [torch.randn(100).half(), torch.randn(7).half()]
        grads[1][3] = INF
        ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
        f1, f2 = torch.zeros(()), torch.zeros(())
        check_group(ours, f1, torch.tensor(INV), None, "auto")
        torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, torch.tensor(INV))
        ok = torch.equal(f1, f2) and all(bits_equal(a, b) for a, b in zip(ours, theirs, strict=True))
        return None if ok else "auto on the CPU is not bitwise torch's op"
    if name == "select-triton-cpu-interpreted":
        ok = triton_ops.INTERPRETED and kernels.backend("triton", cpu, torch.bfloat16) == "triton"
        return None if ok else "kernel='triton' not selected under TRITON_INTERPRET=1"
    if name == "select-bad-dtype":
        try:
            kernels.backend("triton", cpu, torch.float64)
        except ValueError as exc:
            return None if "float64" in str(exc) else f"unclear error: {exc}"
        return "float64 accepted by kernel='triton'"
    if name == "fallback-norm-type-1":
        grads = [torch.randn(50), torch.randn(3, 4)]
        before = [g.clone() for g in grads]
        norm = check_group(grads, torch.zeros(()), torch.tensor(0.5), 1.0, "triton")
        want = reference_norm(before, None, 1.0)
        ok = norm is not None and norm_ok(float(norm), want)
        ok = ok and all(torch.equal(g, b * 0.5) for g, b in zip(grads, before, strict=True))
        return None if ok else f"norm_type=1 fallback: {norm} vs {want}"
    if name == "cache-reuse":
        triton_ops.clear_cache()
        grads = [torch.randn(100), torch.randn(33)]
        triton_ops.fused_check_(grads, torch.zeros(()), None, 2.0)
        plan = next(iter(_table._cache.values()))
        triton_ops.fused_check_(grads, torch.zeros(()), None, 2.0)
        # New tensor objects over the same memory (set_to_none + caching allocator): same table.
        triton_ops.fused_check_([g.detach() for g in grads], torch.zeros(()), None, 2.0)
        same = len(_table._cache) == 1 and next(iter(_table._cache.values())) is plan
        triton_ops.fused_check_([grads[0], torch.randn(33)], torch.zeros(()), None, 2.0)
        return None if same and len(_table._cache) == 2 else "the table cache did not behave"
    if name == "flat-spans-merged":
        triton_ops.clear_cache()
        tensors, counts, block = layout("flat", torch.float16)
        triton_ops.fused_check_(tensors, torch.zeros(()), None, 2.0, norm_numels=counts, block=block)
        plan = next(iter(_table._cache.values()))
        # [counted, uncounted] merge; then [counted, partly counted] merge: two spans, no staging.
        return (
            None
            if plan.n_spans == 2 and not plan.staged
            else f"{plan.n_spans} spans, {len(plan.staged)} staged"
        )
    if name == "scaler-triton-vs-torch":
        for opt in ("sgd", "adamw-fused"):
            for clip in (False, True):
                s1, p1 = _train("triton", opt, clip)
                s2, p2 = _train("torch", opt, clip)
                if s1 != s2:
                    return f"{opt} clip={clip}: scales {s1} != {s2}"
                # Without a clip the unscaled values are bitwise torch's; the fused norm rounds apart.
                same = all(
                    torch.equal(a, b) if not clip else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                    for a, b in zip(p1, p2, strict=True)
                )
                if not same:
                    return f"{opt} clip={clip}: parameters differ"
        return None
    if name == "scaler-clip-one-pass":
        calls = []
        original = kernels.norms
        kernels.norms = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[assignment]
        try:
            _train("triton", "sgd", clip=True, steps=3)
            _train("triton", "adamw-fused", clip=True, steps=3)
        finally:
            kernels.norms = original  # type: ignore[assignment]
        return None if not calls else f"a separate norm pass ran {len(calls)} times"
    if name == "gradset-fused-norm":
        return _gradset_fused_norm()
    raise AssertionError(name)


def _gradset_optimizer() -> torch.optim.Optimizer:
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


def _gradset_fused_norm() -> str | None:
    from types import SimpleNamespace

    from distscale.overflow import ClassificationCache, GradSet

    # On one process every element counts; as rank 1 of 4 (no layout declared), only the flat
    # shard does: its sizes prove FSDP1 shards it over the 4 ranks, the plain tensors are unknown.
    for rank in (0, 1):
        group = None if rank == 0 else SimpleNamespace(global_ranks=(0, 1, 2, 3), global_rank=1)
        for unscale in (False, True):
            for norm_type in (2.0, INF):
                results = []
                for kernel in ("triton", "torch"):
                    opt = _gradset_optimizer()
                    grads = GradSet(opt, ClassificationCache(group=group), kernel)
                    found = torch.zeros(())
                    inv = torch.tensor(0.25) if unscale else None
                    grads.check_(found, inv, norm_type)
                    if (grads._fused_norm is not None) != (kernel == "triton"):
                        return f"{kernel}: fused norm {'missing' if kernel == 'triton' else 'present'}"
                    scale_by = None if unscale else torch.tensor(0.25)
                    norm = grads.local_norm(norm_type, torch.device("cpu"), scale_by)
                    results.append(
                        (float(norm), found.item(), [p.grad.clone() for p in opt.param_groups[0]["params"]])
                    )
                (n1, f1, g1), (n2, f2, g2) = results
                if (
                    not norm_ok(n1, n2)
                    or f1 != f2
                    or not all(bits_equal(a, b) for a, b in zip(g1, g2, strict=True))
                ):
                    return f"rank={rank} unscale={unscale} norm={norm_type}: {n1} vs {n2}, found {f1} vs {f2}"
    return None


def _interpreter_main(out_path: str) -> None:
    results: dict[str, str | None] = {}
    for name in CASE_NAMES:
        try:
            results[name] = _run_special(name) if name in SPECIAL_CASES else _run_numeric(name)
        except Exception as exc:  # report, do not stop: one failure must not hide the others
            results[name] = f"raised {type(exc).__name__}: {exc}"
    Path(out_path).write_text(json.dumps(results))


# ------------------------------------------------------------------ the pytest side: interpreter


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "tests.test_kernels", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASE_NAMES)
def test_interpreted_kernel(interpreter_results: dict[str, str | None], case: str) -> None:
    assert case in interpreter_results, "case not run"
    problem = interpreter_results[case]
    assert problem is None, problem


# ------------------------------------------------------------------ in process: selection, errors


def test_kernel_choices_include_triton() -> None:
    assert kernels.KERNEL_CHOICES == ("auto", "torch", "reference", "triton")
    with pytest.raises(ValueError, match="one of"):
        GradScaler("cpu", kernel="trition")


def test_auto_on_cpu_is_torch_bitwise() -> None:
    cpu = torch.device("cpu")
    for dtype in DTYPES.values():
        assert kernels.backend("auto", cpu, dtype) == "torch"
        tensors, _, _ = layout("sizes", dtype)
        plant(tensors, "last", NAN)
        theirs = [t.clone() for t in tensors]
        f1, f2 = torch.zeros(()), torch.zeros(())
        norm = check_group(tensors, f1, torch.tensor(INV), 2.0)
        torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, torch.tensor(INV))
        assert torch.equal(f1, f2) and f1.item() == 1.0
        assert all(bits_equal(a, b) for a, b in zip(tensors, theirs, strict=True))
        assert norm is not None and math.isnan(float(norm))


def test_fused_check_fallback_semantics_on_cpu() -> None:
    # The two-pass fallback: norm of the values as read, counted prefixes only; then the check.
    tensors, counts, _ = layout("prefix", torch.float32)
    before = [t.clone() for t in tensors]
    found = torch.zeros(())
    norm = check_group(tensors, found, torch.tensor(0.5), 2.0, "torch", norm_numels=counts)
    assert norm is not None and norm_ok(float(norm), reference_norm(before, counts, 2.0))
    assert found.item() == 0.0
    assert all(torch.equal(t, b * 0.5) for t, b in zip(tensors, before, strict=True))
    assert check_group([], found, None, None) is None
    empty = check_group([], found, None, INF)
    assert empty is not None and float(empty) == 0.0


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="TRITON_INTERPRET is set for this process",
)
def test_triton_on_cpu_needs_the_interpreter() -> None:
    grads = [torch.randn(4)]
    with pytest.raises(ValueError, match=r"kernel='triton'.*TRITON_INTERPRET=1"):
        check_group(grads, torch.zeros(()), None, None, "triton")
    with pytest.raises(ValueError, match="kernel='triton'"):
        check_group(grads, torch.zeros(()), None, 2.0, "triton")
    scaler = GradScaler("cpu", kernel="triton")
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.randn(2, 3)).sum()).backward()
    with pytest.raises(ValueError, match="kernel='triton'"):
        scaler.unscale_(optimizer)


def test_missing_triton_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "distscale.kernels.triton_ops", raising=False)
    with pytest.raises(ImportError, match=r'pip install "distscale\[triton\]"'):
        importlib.import_module("distscale.kernels.triton_ops")


def test_span_merging() -> None:
    # (address, numel, counted) with 4-byte elements.
    spans = _table.merge_spans([(1000, 10, 10), (1040, 5, 0), (1060, 4, 4), (2000, 3, 3), (1076, 2, 1)], 4)
    # 1000..1040 counted + 1040..1060 uncounted merge; 1060 does not (its counted elements would
    # follow uncounted ones); 1060..1076 + 1076..1084 merge with a counted prefix of 5.
    assert spans == [(1000, 15, 10), (1060, 6, 5), (2000, 3, 3)]
    assert _table.merge_spans([(1000, 4, 4), (1008, 4, 4)], 4) == [
        (1000, 4, 4),
        (1008, 4, 4),
    ]  # overlap


# ------------------------------------------------------------------ GPU

gpu = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset: the interpreter runs kernels on the host)",
)

GPU_SIZES = {
    "empty": [0],
    "one": [1],
    "odd": [7, 3, 1],
    "pow2pm1": [8191, 8193, 2**20 - 1, 2**20 + 1],
    "grid": [3 * 2**22 + 7],  # many more blocks than the GPU has SMs
    "many": [(i * 7919) % 5000 + 1 for i in range(300)],
}


def _gpu_tensors(sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(n, device="cuda", generator=gen) * 8).to(dtype) for n in sizes]


@gpu
@requires_gpu
@pytest.mark.parametrize(
    "plant_at", [None, *PLANTS], ids=lambda p: "clean" if p is None else f"{p[1]}@{p[0]}"
)
@pytest.mark.parametrize("sizes", list(GPU_SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gpu_kernel_matches_reference(
    dtype: torch.dtype, sizes: str, plant_at: tuple[str, float] | None
) -> None:
    pytest.importorskip("triton")
    from distscale.kernels import triton_ops

    for unscale, norm in MODES:
        tensors = _gpu_tensors(GPU_SIZES[sizes], dtype)
        if plant_at is not None:
            plant(tensors, *plant_at)
        problem = check_case(tensors, None, None, unscale, norm, triton_ops.fused_check_)
        assert problem is None, f"unscale={unscale} norm={norm}: {problem}"


@gpu
@requires_gpu
@pytest.mark.parametrize("lay", ["strided", "flat", "prefix", "sizes"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gpu_layouts(dtype: torch.dtype, lay: str) -> None:
    pytest.importorskip("triton")
    from distscale.kernels import triton_ops

    for unscale, norm in MODES:
        tensors, counts, block = layout(lay, dtype)
        tensors = [t.cuda() for t in tensors] if lay != "flat" else _flat_on_gpu(dtype)
        plant(tensors, "last", NAN)
        problem = check_case(tensors, counts, block, unscale, norm, triton_ops.fused_check_)
        assert problem is None, f"unscale={unscale} norm={norm}: {problem}"


def _flat_on_gpu(dtype: torch.dtype) -> list[torch.Tensor]:
    # .cuda() on views copies each one: rebuild the views over one device buffer instead.
    flat = (torch.randn(4100, device="cuda") * 8).to(dtype)
    return [flat[1:1001].view(10, 100), flat[1001:1002], flat[1002:3001], flat[3001:4100]]


@gpu
@requires_gpu
def test_gpu_auto_picks_triton() -> None:
    pytest.importorskip("triton")
    for dtype in DTYPES.values():
        assert kernels.backend("auto", torch.device("cuda"), dtype) == "triton"


class _Mixed(nn.Module):
    """fp32 and fp16 parameters: two (device, dtype) groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 8).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).half()).float()


@gpu
@requires_gpu
def test_gpu_full_step_has_no_host_sync() -> None:
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = _Mixed().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = GradScaler("cuda", kernel="triton")
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def step() -> None:
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.clip_grad_norm_(optimizer, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=False)

    step()  # warm-up: state moved to the device, kernels compiled, tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@requires_gpu
def test_gpu_cuda_graph_step_matches_eager() -> None:
    pytest.importorskip("triton")
    steps, warmup, bad_step = 10, 3, 6
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [
        (torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 4, device="cuda", generator=gen))
    ]
    batches += [
        (torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 4, device="cuda", generator=gen))
        for _ in range(steps - 1)
    ]
    batches[bad_step][0][0, 0] = INF  # overflows the backward: a skipped step inside the graph

    def make() -> tuple[nn.Module, torch.optim.Optimizer, GradScaler]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
        return model, opt, GradScaler("cuda", init_scale=2.0**10, growth_interval=2, kernel="triton")

    def step(model: nn.Module, opt: torch.optim.Optimizer, scaler: GradScaler, x, y) -> None:
        opt.zero_grad(set_to_none=False)  # backward must reuse the grads the tables point at
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        scaler.scale((out.float() - y).pow(2).mean()).backward()
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()

    eager = make()
    scales_eager = []
    for x, y in batches:
        step(*eager, x, y)
        scales_eager.append(eager[2]._state.scale.clone())

    graphed = make()
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    scales_graph = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:warmup]:
            static_x.copy_(x)
            static_y.copy_(y)
            step(*graphed, static_x, static_y)
            scales_graph.append(graphed[2]._state.scale.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*graphed, static_x, static_y)
    for x, y in batches[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        scales_graph.append(graphed[2]._state.scale.clone())
    torch.cuda.synchronize()
    assert torch.equal(torch.stack(scales_graph), torch.stack(scales_eager))
    assert scales_eager[bad_step] < scales_eager[bad_step - 1]  # the planted step was skipped
    for a, b in zip(graphed[0].parameters(), eager[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
