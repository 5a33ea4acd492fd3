"""Run the main job under each scaling rule and print what each did, side by side.

    python launch/compare_policies.py                       # torch, deepspeed, megatron, fairseq, amax
    python launch/compare_policies.py --steps 300 --nproc 4 --policies torch deepspeed
    python launch/compare_policies.py --out bench/results/policies.md -- --parallel ddp

Each rule runs in its own ``torchrun --standalone`` job (``--nproc 1``: one plain process) on the
same data, model and seed; arguments after ``--`` go to ``launch/train.py``. The table comes from
each run's summary line and per-step metrics (``--metrics``), which stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train import POLICIES  # noqa: E402  (launch/ is not a package)

COLUMNS = (
    "policy", "skipped steps", "final loss", "final scale", "mean log2 scale", "underflow", "min scale",
    "max consecutive", "wall s",
)  # fmt: skip


def command(policy: str, nproc: int, steps: int, metrics: Path, extra: list[str]) -> list[str]:
    job = [str(HERE / "train.py"), "--policy", policy, "--steps", str(steps), "--no-progress"]
    job += ["--metrics", str(metrics), *extra]
    if nproc == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *job]


def read_run(metrics: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A run's per-step records and its (last) summary, from its JSON lines."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = next(line for line in reversed(lines) if line.get("summary"))
    return [line for line in lines if not line.get("summary")], summary


def markdown(columns: tuple[str, ...], rows: list[dict[str, Any]], cell: Any = lambda _c, v: str(v)) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after ``--`` for every launch/train.py run)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def publish(text: str, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def summarize(policy: str, metrics: Path) -> dict[str, Any]:
    """One table row from a run's JSON lines (the per-step records, then the summary)."""
    steps, summary = read_run(metrics)
    scales = [s["scale"] for s in steps]
    # The underflow monitor's readings (every --underflow-every steps): the mean fraction of
    # gradient elements the scale left at or below fp16's smallest subnormal.
    readings = [s["underflow_fraction"] for s in steps if _measured(s.get("underflow_fraction"))]
    return {
        "policy": policy,
        "skipped steps": summary["skipped_steps"],
        "final loss": summary["final_loss"],
        "final scale": summary["scale"],
        "min scale": min(scales) if scales else math.nan,
        "mean log2 scale": sum(map(math.log2, scales)) / len(scales) if scales else math.nan,
        "underflow": sum(readings) / len(readings) if readings else math.nan,
        "max consecutive": max((s.get("max_consecutive_overflows", 0) for s in steps), default=0),
        "wall s": summary["wall_time_s"],
    }


def _measured(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def table(rows: list[dict[str, Any]]) -> str:
    def cell(column: str, value: Any) -> str:
        if column == "wall s":
            return f"{value:.1f}"
        if column == "mean log2 scale":
            return f"{value:.2f}"
        if column == "underflow":
            return f"{value:.2e}"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:g}"
        return str(value)

    return markdown(COLUMNS, rows, cell)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv, extra = split_extra(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (1: a plain process)")
    p.add_argument("--workdir", type=Path, help="where the per-run metrics go (default: a temp dir)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.nproc < 1:
        p.error(f"--steps and --nproc must be >= 1, got {args.steps} and {args.nproc}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distscale-policies-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        metrics = workdir / f"{policy}.jsonl"
        metrics.unlink(missing_ok=True)  # the job appends; a rerun starts fresh
        print(f"running --policy {policy} ...", flush=True)
        subprocess.run(command(policy, args.nproc, args.steps, metrics, extra), check=True)
        rows.append(summarize(policy, metrics))
    text = table(rows)
    print(f"\n{args.steps} steps, {args.nproc} rank(s), metrics in {workdir}\n\n{text}")
    publish(text, args.out)
    return rows


if __name__ == "__main__":
    main()
