"""Kernel selection and the local check's semantics (distscale.kernels), in this process, and the
interpreter tier run in a subprocess.

Triton decides between its interpreter and its compiler when a kernel is decorated, and this
process compiles kernels (tests/test_kernels_compile.py), so the interpreter tests
(``tests/interpreted``: the fused check and the fused update against the torch reference, case by
case) run as ordinary pytest tests in a subprocess started with ``TRITON_INTERPRET=1``; its output,
tracebacks included, is this test's failure message.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distscale import GradScaler, kernels
from tests.kernel_cases import (
    DTYPES,
    INF,
    INV,
    NAN,
    bits_equal,
    check_group,
    layout,
    norm_ok,
    plant,
    reference_norm,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the interpreter tier


@pytest.mark.slow
def test_kernels_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="the interpreter tier needs Triton: pip install 'distscale[triton]'")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"tests/interpreted: {summary}")
    if proc.returncode != 0 or " passed" not in summary or "skipped" in summary:
        pytest.fail(
            f"tests/interpreted ({proc.returncode}): {summary}\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
        )


# ---------------------------------------------------------------------------- in process: selection, errors


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


# ------------------------------------------------------------------ GPU


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_amax_is_the_largest_magnitude_as_read_over_every_element(kernel: str) -> None:
    tensors, counts, _ = layout("prefix", torch.float32)  # the norm counts prefixes; amax reads all
    tensors[2].view(-1)[-1] = -1e4  # outside every counted prefix
    want = max(float(t.abs().max()) for t in tensors)
    amax = torch.zeros(())
    check_group(tensors, torch.zeros(()), torch.tensor(0.5), 2.0, kernel, norm_numels=counts)
    assert amax.item() == 0.0  # not asked: not measured
    tensors, counts, _ = layout("prefix", torch.float32)
    tensors[2].view(-1)[-1] = -1e4
    backend = kernels.backend(kernel, torch.device("cpu"), torch.float32)
    kernels.check_(
        tensors, torch.zeros(()), torch.tensor(0.5), 2.0, backend=backend, norm_numels=counts, amax_out=amax
    )
    assert amax.item() == want == 1e4  # read before the unscale halved it
    kernels.check_([torch.zeros(0)], torch.zeros(()), None, backend=backend, amax_out=amax)
    assert amax.item() == 1e4  # an empty group leaves it alone
    kernels.check_([torch.tensor([1.0, NAN])], torch.zeros(()), None, backend=backend, amax_out=amax)
    assert math.isnan(amax.item())  # NaN propagates, as the inf-norm does
