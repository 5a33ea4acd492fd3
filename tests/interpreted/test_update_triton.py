"""The fused update (distscale.kernels.update_triton) in Triton's interpreter: bit for bit
``policy.update`` + ``stats.update_stats`` on random sequences for every rule variant, and a whole
scaler run with ``kernel="triton"`` equal to one with ``kernel="torch"``."""

from __future__ import annotations

import json

import pytest
import torch

from distscale import kernels
from tests.kernel_cases import rule_configs, rule_sequence, scaler_run

CONFIGS = rule_configs()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_update_is_bitwise_the_torch_rule(name: str) -> None:
    assert kernels.backend("triton", torch.device("cpu"), torch.float32) == "triton"
    problem = rule_sequence(CONFIGS[name], seed=list(CONFIGS).index(name))
    assert problem is None, problem


def test_scaler_with_the_fused_update_matches_the_torch_rule() -> None:
    fused, plain = scaler_run("triton", "cpu"), scaler_run("torch", "cpu")
    assert sum(r["step_was_skipped"] for r in fused["records"]) == 3
    assert json.dumps(fused, sort_keys=True) == json.dumps(plain, sort_keys=True)
