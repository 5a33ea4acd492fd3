"""The Triton kernels compile for real GPUs, on a machine without one.

Triton's interpreter (the CPU tier of tests/test_kernels.py and tests/test_update_kernel.py)
accepts code the compiler rejects (types, constexpr use, pointer casts). Compiling ahead of time
for sm_80 (A100) and sm_90 (H100/H200) with Triton's bundled ptxas catches those on CPU, and the
PTX shows what the GPU will run (16-byte vector loads on full blocks, round-to-nearest casts).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="TRITON_INTERPRET is set for this process: kernels are interpreted, not compiled",
)

import triton  # noqa: E402  (the dev extra installs it: a missing Triton fails here, not skips)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from distscale.kernels import triton_ops, update_triton  # noqa: E402

ARCHS = (80, 90)


def _compile(fn, types: dict[str, str], constexprs: dict[str, object], arch: int):
    names = fn.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    source = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


UPDATE_TYPES = {
    **dict.fromkeys(
        [
            "scale_ptr",
            "norm_out_ptr",
            "zero_out_ptr",
            "under_out_ptr",
            "found_ptr",
            "norm_in_ptr",
            "amax_out_ptr",
            "headroom_out_ptr",
            "amax_in_ptr",
            "amax_window_ptr",
        ],
        "*fp32",
    ),
    "growth_ptr": "*i32",
    "hyst_ptr": "*i32",
    "calibrated_ptr": "*i32",
    **dict.fromkeys(
        [
            "updates_ptr",
            "skipped_ptr",
            "min_events_ptr",
            "since_rescale_ptr",
            "overflows_since_ptr",
            "ovf_ptr",
            "consec_ptr",
            "max_consec_ptr",
            "since_ovf_ptr",
            "at_min_ptr",
            "step_ovf_ptr",
            "change_out_ptr",
        ],
        "*i64",
    ),
    "was_skipped_ptr": "*i1",
    "zero_in_ptr": "*fp32",
    "under_in_ptr": "*fp32",
    "consts_ptr": "*fp64",
}
UPDATE_BASE = dict(
    GROWTH_INTERVAL=2000, HYSTERESIS=1, GROWTH_DELAY=0, REFILL_ON_GROWTH=True, HAS_TOLERANCE=False,
    HAS_MIN=False, MIN_FLOOR=True, HAS_MAX=False, HAS_NORM=False, HAS_UNDERFLOW=False, HAS_STEP_OVF=False,
    HAS_AMAX=False, AMAX_RULE=False,
)  # fmt: skip
UPDATE_VARIANTS = {
    "torch": {},
    "every-option": dict(
        HYSTERESIS=2, GROWTH_DELAY=1, REFILL_ON_GROWTH=False, HAS_TOLERANCE=True, HAS_MIN=True, HAS_MAX=True,
        HAS_NORM=True, HAS_UNDERFLOW=True, HAS_STEP_OVF=True,
    ),
    "refuse": dict(HAS_MIN=True, MIN_FLOOR=False, HAS_TOLERANCE=True),
    "amax": dict(HAS_AMAX=True, AMAX_RULE=True, HAS_MIN=True, HAS_MAX=True, HYSTERESIS=2),
}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", sorted(UPDATE_VARIANTS))
def test_update_kernel_compiles(variant: str, arch: int) -> None:
    kernel = _compile(
        update_triton._update_kernel, UPDATE_TYPES, {**UPDATE_BASE, **UPDATE_VARIANTS[variant]}, arch
    )
    ptx = kernel.asm["ptx"]
    assert kernel.asm.get("cubin"), "ptxas produced no cubin"
    assert "cvt.rn.f32.f64" in ptx, "scale products must round to nearest from float64"


CHECK_TYPES = {
    "table_ptr": "*i64",
    "n_spans": "i64",
    "found_ptr": "*fp32",
    "inv_ptr": "*fp32",
    "partial_ptr": "*fp32",
    "amax_partial_ptr": "*fp32",
}
TL_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", sorted(TL_DTYPES))
@pytest.mark.parametrize(
    ("unscale", "norm", "amax"),
    [(True, 1, False), (False, 1, False), (True, 0, False), (False, 2, False), (True, 1, True)],
)
def test_check_kernel_compiles(dtype: str, unscale: bool, norm: int, amax: bool, arch: int) -> None:
    import triton.language as tl

    torch_dtype = getattr(torch, TL_DTYPES[dtype])
    block = 16384 // torch_dtype.itemsize
    constexprs = {
        "DTYPE": getattr(tl, TL_DTYPES[dtype]),
        "BLOCK": block,
        "UNSCALE": unscale,
        "NORM": norm,
        "AMAX": amax,
        "BF16_BY_HAND": False,
    }
    kernel = _compile(triton_ops._check_kernel, CHECK_TYPES, constexprs, arch)
    ptx = kernel.asm["ptx"]
    assert kernel.asm.get("cubin"), "ptxas produced no cubin"
    # Full blocks are read with 16-byte vector loads (the memory-bandwidth floor needs them).
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, "no 128-bit loads in the compiled kernel"
    if unscale:
        assert "st.global.v4" in ptx or "st.global.v2" in ptx, "unscaled values are not stored vectorized"
    else:
        assert "st.global.v4" not in ptx and "st.global.v2" not in ptx, "read-only mode writes gradients"
