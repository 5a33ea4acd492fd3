"""distscale vs torch.amp.GradScaler vs ShardedGradScaler on real gloo ranks (CPU).

    python -m bench.consistency            # writes bench/results/<date>-cpu-consistency.{json,md}

For every setup and scaler: 7 steps of fp16 training, inf/NaN planted after backward in *one*
rank's local gradient shard on 3 steps (tests/dist_cases.py). Measured per setup: whether every
rank ends every step with the same scale and the same skip decision, backend collectives issued
by the scaler calls per step (``gloo:*`` profiler events), host reads per step
(``Tensor.item/__bool__/tolist/__float__/__int__`` inside the scaler calls), and any error.
These are correctness counts, not timings: they do not depend on the machine.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import sys
from typing import Any

import torch

from distscale.testing import run_ranks
from tests import dist_cases as dc

SCALERS = ["distscale", "torch", "sharded"]
VARIANT_NAMES = {
    (("optimizer", "sgd"),): "SGD",
    (("clip", True), ("optimizer", "sgd")): "SGD + clip",
    (("optimizer", "adamw_fused"),): "fused AdamW",
    (("explicit_unscale", True), ("optimizer", "adamw_fused")): "fused AdamW + unscale_",
    (("clip", True), ("optimizer", "adamw_fused")): "fused AdamW + clip",
}


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for key in results[0]:
        setup, kind, variant = key
        runs = [r[key] for r in results]
        errors = sorted({r["error"] for r in runs if r["error"]})
        consistent = not errors and all(
            r["scales"] == runs[0]["scales"] and r["stepped"] == runs[0]["stepped"] for r in runs
        )
        rows.append(
            {
                "setup": setup,
                "scaler": kind,
                "variant": VARIANT_NAMES[variant],
                "consistent": consistent,
                "collectives_per_step": sorted({c for r in runs for c in r["collectives"]}),
                "host_reads_per_step": sorted({c for r in runs for c in r["host_reads"]}),
                "error": errors[0] if errors else None,
                "scales_by_rank": [r["scales"] for r in runs],
            }
        )
    return rows


def _cell(row: dict) -> str:
    if row["error"]:
        return f"error: {row['error'][:60]}"
    fmt = lambda xs: "/".join(map(str, xs)) or "-"  # noqa: E731
    verdict = "yes" if row["consistent"] else "**DIVERGED**"
    return f"{verdict}, {fmt(row['collectives_per_step'])} coll, {fmt(row['host_reads_per_step'])} reads"


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| setup | variant | " + " | ".join(SCALERS) + " |",
        "|---|---|" + "---|" * len(SCALERS),
    ]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        seen.setdefault((row["setup"], row["variant"]), {})[row["scaler"]] = row
    for (setup, variant), by_scaler in seen.items():
        cells = [_cell(by_scaler[s]) if s in by_scaler else "-" for s in SCALERS]
        lines.append(f"| {setup} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    setups_2 = [s for s in dc.MATRIX_2 if s != "fsdp1_offload"]  # needs an accelerator
    rows = summarize(run_ranks(dc.job_matrix, 2, setups_2, SCALERS, timeout=900))
    rows += summarize(run_ranks(dc.job_matrix, 4, dc.MATRIX_4, SCALERS, timeout=900))
    date = datetime.date.today().isoformat()
    meta = {
        "date": date,
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backend": "gloo",
    }
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{date}-cpu-consistency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (
        f"Consistency, collectives and host reads per step ({date}, CPU, gloo, torch {meta['torch']}; "
        "2 ranks for DDP/FSDP1/FSDP2, 4 ranks for HSDP 2x2 and FSDP2+TP 2x2). "
        "Produced by `python -m bench.consistency`."
    )
    markdown = to_markdown(rows, header)
    (out / f"{date}-cpu-consistency.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
