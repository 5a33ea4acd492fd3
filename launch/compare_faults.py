"""Inject faults into the main job and show, side by side, what each scaler makes of them.

    python launch/compare_faults.py                          # 2 ranks, DDP, 200 steps
    python launch/compare_faults.py --steps 400 --out bench/results/faults.md

Runs (each its own ``torchrun --standalone`` job, same data, model and seed, ``--parallel ddp``):

* ``clean``: distscale, nothing injected (the reference loss);
* ``torch``: ``torch.amp.GradScaler`` on every rank, with the faults;
* ``distscale``: distscale as before the skip rules (every non-finite step is an overflow);
* ``distscale + rules``: ``--skip-loss-sigma``/``--skip-norm-sigma`` and ``--on-fault warn``.

The faults: rank 1's targets replaced by noise at ``--corrupt-step`` (a mislabelled batch: a loss
spike), and a NaN in rank 1's gradients after backward from ``--nan-from`` on (for ``--nan-steps``
steps; 0: to the end): a faulty device. Under DDP the gradients were already averaged, so only
rank 1 sees it. Arguments after ``--`` go to every ``launch/train.py`` run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_policies import markdown, publish, read_run, split_extra  # noqa: E402  (launch/ is not a package)

COLUMNS = (
    "run", "steps skipped (rank 0 / 1)", "overflow", "norm spike", "loss spike", "fault", "fault named",
    "scale (rank 0 / 1)", "replicas equal", "final loss", "vs clean",
)  # fmt: skip


def runs(args: argparse.Namespace) -> dict[str, list[str]]:
    nan = f"1:{args.nan_from}" + (f":{args.nan_steps}" if args.nan_steps else "")  # 0: to the end
    faults = ["--corrupt-batch", f"1:{args.corrupt_step}", "--inject-nan", nan]
    rules = [
        "--skip-loss-sigma",
        "6",
        "--skip-norm-sigma",
        "6",
        "--spike-window",
        "50",
        "--spike-warmup",
        "50",
    ]
    return {
        "clean": [],
        "torch": ["--scaler", "torch", *faults],
        "distscale": faults,
        "distscale + rules": [*faults, *rules, "--on-fault", "warn"],
    }


def run_one(name: str, flags: list[str], args: argparse.Namespace, workdir: Path, extra: list[str]) -> dict:
    metrics = workdir / (name.replace(" + ", "_") + ".jsonl")
    metrics.unlink(missing_ok=True)  # the job appends; a rerun starts fresh
    job = [str(HERE / "train.py"), "--parallel", "ddp", "--steps", str(args.steps), "--no-progress"]
    job += ["--metrics", str(metrics), *flags, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *job]
    print(f"running {name} ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_run(metrics)[1]


def row(name: str, summary: dict[str, Any], clean_loss: float) -> dict[str, Any]:
    reasons = summary.get("skipped_by_reason", {})
    fault = summary.get("fault")
    return {
        "run": name,
        "steps skipped (rank 0 / 1)": " / ".join(str(n) for n in summary["skipped_by_rank"]),
        "overflow": reasons.get("overflow", "-") if name != "torch" else "-",
        "norm spike": reasons.get("norm_spikes", 0),
        "loss spike": reasons.get("loss_spikes", 0),
        "fault": reasons.get("suspected_faults", 0),
        "fault named": fault.splitlines()[0].split("): ", 1)[-1] if fault else "-",
        "scale (rank 0 / 1)": " / ".join(f"{s:g}" for s in summary["scale_by_rank"]),
        "replicas equal": summary.get("replicas_equal"),
        "final loss": f"{summary['final_loss']:.4f}",
        "vs clean": f"{summary['final_loss'] - clean_loss:+.4f}",
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv, extra = split_extra(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--corrupt-step", type=int, default=100)
    p.add_argument("--nan-from", type=int, default=140)
    p.add_argument("--nan-steps", type=int, default=0, help="steps with the NaN (0: to the end)")
    p.add_argument("--workdir", type=Path, help="where the per-run metrics go (default: a temp dir)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    if not 0 <= args.corrupt_step < args.steps or not 0 <= args.nan_from < args.steps or args.nan_steps < 0:
        p.error("--corrupt-step and --nan-from must be steps of the run, --nan-steps >= 0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distscale-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summaries = {name: run_one(name, flags, args, workdir, extra) for name, flags in runs(args).items()}
    clean = summaries["clean"]["final_loss"]
    rows = [row(name, s, clean) for name, s in summaries.items()]
    text = markdown(COLUMNS, rows)
    span = f"for {args.nan_steps} steps" if args.nan_steps else "to the end"
    print(
        f"\n{args.steps} steps, 2 ranks (DDP); rank 1: noise targets at step {args.corrupt_step}, NaN "
        f"gradients from step {args.nan_from} {span}; metrics in {workdir}\n\n{text}"
    )
    publish(text, args.out)
    return rows


if __name__ == "__main__":
    main()
