"""The fused update (distscale.kernels.update_triton) on a GPU (marker ``gpu``): a scaler run with
``kernel="triton"`` equals one with ``kernel="torch"``. Its CPU tier (the kernel bit for bit the
torch rule, in Triton's interpreter) is ``tests/interpreted/test_update_triton.py``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.kernel_cases import scaler_run


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tier runs the interpreter)"
)
def test_fused_update_on_gpu_matches_the_torch_rule() -> None:
    fused, plain = scaler_run("triton", "cuda"), scaler_run("torch", "cuda")
    assert sum(r["step_was_skipped"] for r in fused["records"]) == 3
    assert json.dumps(fused, sort_keys=True) == json.dumps(plain, sort_keys=True)
