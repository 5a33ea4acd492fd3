"""Triton's interpreter runs these tests' kernels on CPU tensors. Triton decides between
interpreter and compiler when a kernel is decorated, so ``TRITON_INTERPRET=1`` must be set before
Triton is first imported: ``tests/test_kernels.py`` starts this directory in a subprocess with it
set (the main suite does not collect it; see ``norecursedirs``). Run directly:
``TRITON_INTERPRET=1 python -m pytest tests/interpreted``."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton


@pytest.fixture(scope="session", autouse=True)
def _interpreted() -> None:
    pytest.importorskip("triton", reason="the interpreter tests need Triton: pip install 'distscale[triton]'")
    from distscale.kernels import triton_ops

    if not triton_ops.INTERPRETED:
        pytest.exit("Triton was imported before TRITON_INTERPRET=1 was set: run this directory alone", 2)
