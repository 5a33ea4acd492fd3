"""PyTorch's own GradScaler unit tests, run against ``distscale.GradScaler`` (issue 12).

    pip install expecttest      # torch's test utilities need it
    python -m bench.torch_suite PYTORCH/test/test_torch.py [--class TestTorchDeviceType] [--out results.md]
    python -m bench.torch_suite PYTORCH/test/test_cuda.py --class TestCudaOptims

torch's wheels ship no test files and distscale copies none: this reads a PyTorch test file,
takes the grad-scaling methods of one of its device-generic test classes (``TestTorchDeviceType``
of ``test/test_torch.py`` by default, or ``TestCudaOptims`` of ``test/test_cuda.py``, whose fused
optimizer tests run on the CPU too; names matching :data:`SELECTED`, with their decorators and the
file's imports), and runs them on the CPU twice in one process: with torch's own ``GradScaler``, the
baseline, and with ``torch.GradScaler`` and ``torch.amp.GradScaler`` replaced by
``distscale.GradScaler``. An import of the file that this torch lacks is skipped and named; a test
that needs it then fails in both columns alike. Prints a Markdown table of both outcomes per test.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import re
import sys
import textwrap
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import distscale

DEFAULT_CLASS = "TestTorchDeviceType"
SELECTED = re.compile(r"grad_?scal|gradscaler|scaling_case|params_invalidated")


def _module_source(path: Path, class_name: str) -> tuple[list[str], str]:
    """(the file's top-level import statements, the source of a test class holding the selected
    methods of ``class_name``)."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    imports = [
        ast.get_source_segment(text, node) or ""
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    if not classes:
        raise SystemExit(f"{path}: no class {class_name}; pass its PyTorch test file (--class)")
    methods = []
    for node in classes[0].body:
        if isinstance(node, ast.FunctionDef) and SELECTED.search(node.name):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            methods.append(textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])))
    if not methods:
        raise SystemExit(f"{path}: no method of {class_name} matches {SELECTED.pattern!r}")
    body = "\n\n".join(textwrap.indent(m, "    ") for m in methods)
    return imports, f"class GradScalingTests(TestCase):\n    exact_dtype = True\n\n{body}\n"


def _namespace(imports: list[str]) -> tuple[dict[str, Any], list[str]]:
    namespace: dict[str, Any] = {"__name__": "torch_suite_tests"}
    missing = []
    for statement in imports:
        try:
            exec(compile(statement, "<test_torch imports>", "exec"), namespace)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{statement.splitlines()[0]} ... ({type(exc).__name__}: {exc})")
            # Import what the statement's other names still can, one by one.
            node = ast.parse(statement).body[0]
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    with contextlib.suppress(ImportError, AttributeError):
                        exec(
                            f"from {node.module} import {alias.name} as {alias.asname or alias.name}",
                            namespace,
                        )
    from torch.testing._internal.common_utils import TestCase

    namespace["TestCase"] = TestCase
    return namespace, missing


@contextlib.contextmanager
def _scaler_class(kind: str) -> Iterator[None]:
    if kind == "torch":
        yield
        return
    saved = torch.GradScaler, torch.amp.GradScaler
    torch.GradScaler = torch.amp.GradScaler = distscale.GradScaler  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        torch.GradScaler, torch.amp.GradScaler = saved  # type: ignore[misc]


def run(path: Path, kind: str, class_name: str = DEFAULT_CLASS) -> tuple[dict[str, str], list[str]]:
    """Outcome per test ("passed", "skipped: why", "failed: first line") with ``kind``'s class."""
    imports, class_source = _module_source(path, class_name)
    namespace, missing = _namespace(imports)
    outcomes: dict[str, str] = {}

    class Result(unittest.TestResult):
        def addSuccess(self, test: Any) -> None:
            outcomes[test._testMethodName] = "passed"

        def addFailure(self, test: Any, err: Any) -> None:
            outcomes[test._testMethodName] = "failed: " + _first_line(err[1])

        def addError(self, test: Any, err: Any) -> None:
            outcomes[test._testMethodName] = "error: " + _first_line(err[1])

        def addSkip(self, test: Any, reason: str) -> None:
            outcomes[test._testMethodName] = f"skipped: {reason}"

        def addExpectedFailure(self, test: Any, err: Any) -> None:
            outcomes[test._testMethodName] = "expected failure"

        def addUnexpectedSuccess(self, test: Any) -> None:
            outcomes[test._testMethodName] = "failed: unexpected success"

    with _scaler_class(kind):
        exec(compile(class_source, str(path), "exec"), namespace)
        namespace["instantiate_device_type_tests"](namespace["GradScalingTests"], namespace, only_for="cpu")
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(namespace["GradScalingTestsCPU"])
        suite.run(Result())
    return outcomes, missing


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160].replace("|", "\\|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("test_file", type=Path, help="a PyTorch test file: test/test_torch.py, test/test_cuda.py")
    p.add_argument("--class", dest="class_name", default=DEFAULT_CLASS, help="its device-generic test class")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    try:
        import expecttest  # noqa: F401
    except ImportError:
        raise SystemExit("torch's test utilities need expecttest: pip install expecttest") from None
    baseline, missing = run(args.test_file, "torch", args.class_name)
    ours, _ = run(args.test_file, "distscale", args.class_name)
    passed = sum(v == "passed" for v in ours.values())
    lines = [
        f"torch {torch.__version__}, CPU; {args.test_file}: {len(ours)} grad-scaling tests of {args.class_name}; "
        f"with distscale.GradScaler {passed} passed, with torch's {sum(v == 'passed' for v in baseline.values())}",
        "",
        "| test | torch.amp.GradScaler | distscale.GradScaler |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {baseline.get(name, '-')} | {ours[name]} |" for name in sorted(ours)]
    if missing:
        lines += [
            "",
            "Imports of the test file that this torch lacks (skipped):",
            *(f"- `{m}`" for m in missing),
        ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
