"""The design's layer rules that import-linter cannot express (it sees only distscale's own
modules): the rule never touches torch.distributed, and ``import distscale`` needs none of the
optional packages. The rest of the rules are import-linter contracts in pyproject.toml
(``lint-imports``, run by the test command)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ("policy", "stats", "fields", "config")


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "distscale" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # also imports inside functions: lazy is still an import
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", PURE)
def test_the_rule_never_imports_torch_distributed(module: str) -> None:
    bad = sorted(
        name
        for name in _imports(module)
        if name == "torch.distributed" or name.startswith("torch.distributed.")
    )
    assert not bad, f"distscale.{module} imports {bad}: the rule must stay pure (no collectives)"


def test_import_distscale_needs_no_optional_package() -> None:
    """With triton, mpi4py, deepspeed, megatron, matplotlib, tensorboard and tqdm unimportable,
    distscale imports, trains a step on the CPU, and kernel='triton' names the install command."""
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.machinery, sys
        OPTIONAL = ("triton", "mpi4py", "deepspeed", "megatron", "matplotlib", "tensorboard", "tqdm")

        class Missing(importlib.abc.Loader):
            # Found, but fails to import as an absent package would: code that probes with
            # find_spec and then imports inside try/except ImportError sees it missing.
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked for this test)", name=spec.name)

            def exec_module(self, module):
                raise AssertionError("unreachable")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in OPTIONAL:
                    return importlib.machinery.ModuleSpec(name, Missing())
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import distscale

        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = distscale.GradScaler("cpu")
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()
        try:
            from distscale import kernels
            kernels.backend("triton", torch.device("cuda"), torch.float32)
        except ImportError as exc:
            print("hint:", exc)
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok []" in proc.stdout, proc.stdout
    assert 'pip install "distscale[triton]"' in proc.stdout, proc.stdout
