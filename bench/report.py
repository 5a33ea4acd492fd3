"""Writing one run: ``<stem>.json`` (everything) and ``<stem>.md`` (tables), and a stdout summary."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

Results = dict[str, Any]


def _f(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _header(results: Results) -> list[str]:
    m = results["meta"]
    cb = m["copy_bandwidth"]
    timing = (
        "CUDA events around each call, L2 flushed before each rep; host ms = enqueue time (perf_counter, no sync)"
        if m["device_type"] == "cuda"
        else "CPU wall time per call (no separate host time), caches flushed (64 MiB written) before each rep"
    )
    return [
        f"# distscale benchmark: {m['date']}, {m['device']}",
        "",
        f"Produced by `{m['command']}`{' (quick smoke run: timings not meaningful)' if m['quick'] else ''}.",
        f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, Python {m['python']}, "
        f"{m['threads']} torch threads, {m['cpu']}.",
        f"distscale kernels API: {m['kernel_api']}; triton rows: {m['triton_rows']}.",
        f"Copy bandwidth (device-to-device copy of {cb['bytes_copied'] / 2**20:.0f} MiB, read + write counted): "
        f"**{cb['gbs']:.1f} GB/s**.",
        f"Timing: {timing}; median (and minimum) of up to {m['reps']} reps after {m['warmup']} warm-up.",
        f"Host load average (1 min) at start / end: {m['load_avg_1min']['start']} / "
        f"{m['load_avg_1min']['end']} on {m['cpu_count']} CPUs.",
        "",
    ]


def _targets(results: Results) -> list[str]:
    lines = [
        "## Targets (PERF.md)",
        "",
        "| metric | target | status | measured | detail |",
        "|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(f"| {t['metric']} | {t['target']} | {t['status']} | {t['measured']} | {t['detail']} |")
    return [*lines, ""]


def _vs_best(row: dict[str, Any]) -> str:
    if row.get("speedup_vs_best_peer") is None:
        return "-"
    return f"{row['speedup_vs_best_peer']:.2f}× ({row['best_peer']})"


def _verified(row: dict[str, Any]) -> str:
    if row["status"] == "skipped":
        return "skipped"
    if row["status"] == "error":
        return "**error**"
    return "yes" if row.get("verified") else "**FAILED**"


def _kernel_tables(results: Results) -> list[str]:
    lines = [
        "## Local check: distscale vs peers, same inputs, one process",
        "",
        "Bytes model (S = gradient bytes): distscale read-only S (4P fp32), in-place 2S (8P), torch-chain 5S "
        "(20P), torch-fused-check 2S (8P); megatron 5S (2S on overflow); deepspeed 2S + S + 16P + 2S "
        "(2S on overflow). GB/s = bytes / device time. × floor = device time / (bytes / copy bandwidth). "
        "vs best peer = best peer's time / this row's time (> 1: faster than every peer).",
        "",
    ]
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_scenario.setdefault(row["scenario"], []).append(row)
    info = {s["id"]: s for s in results["scenarios"]}
    for scen, rows in by_scenario.items():
        s = info[scen]
        lines += [
            f"### {scen}: {s['desc']} ({s['n_tensors']} tensors, {s['elements'] / 1e6:.2f}M elements, "
            f"{s['grad_bytes'] / 1e6:.1f} MB, {'/'.join(s['dtypes'])})",
            "",
            "| variant | impl | device ms | min ms | host ms | GB/s | % copy bw | × floor | vs best peer | syncs "
            "| verified |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {r['impl']} | {_f(r.get('device_ms'))} | {_f(r.get('device_ms_min'))} | "
                f"{_f(r.get('host_ms'))} | "
                f"{_f(r.get('gbs'), '.1f')} | {_f(r.get('pct_copy_bw'), '.0f')} | {_f(r.get('x_floor'), '.2f')} | "
                f"{_vs_best(r)} | {r.get('syncs', '-')} | {_verified(r)} |"
            )
        lines.append("")
    return lines


def _steps(results: Results) -> list[str]:
    if not results.get("steps"):
        return []
    lines = [
        "## Full scaler step on a small model (one process)",
        "",
        "Region: distscale `clip_grad_norm_` → `step` → `update` vs torch `unscale_` → "
        "`clip_grad_norm_(foreach)` → `step` → `update`; forward/backward untimed.",
        "",
        "| optimizer | scaler | tensors | device ms | host ms | host syncs | scales and params agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["steps"]:
        lines.append(
            f"| {r['optimizer']} | {r['scaler']} | {r['n_tensors']} | {_f(r['device_ms'])} | {_f(r['host_ms'])} | "
            f"{r['syncs']} | {'yes' if r['verified'] else '**no**'} (max rel diff {r['max_rel_param_diff']:.1e}) |"
        )
    return [*lines, ""]


def _multirank(results: Results) -> list[str]:
    mr = results.get("multirank")
    if not mr:
        return []
    if "error" in mr:
        return ["## Multi-rank (gloo, CPU)", "", f"**error**: {mr['error']}", ""]
    model = mr["model"]
    lines = [
        f"## Multi-rank: {mr['world_size']} gloo ranks (CPU), FSDP2 `fully_shard`, SGD, clip to 1.0",
        "",
        f"Model: {model['layers']} × Linear({model['width']}, {model['width']}), batch {model['batch']}; "
        f"{model['steps']} timed steps. ms/step = median over steps of the slowest rank.",
        "",
        "| scaler | scaler region ms/step | whole step ms | collectives/step | host reads/step | planted inf skipped on every rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in mr["rows"]:
        lines.append(
            f"| {r['scaler']} | {_f(r['region_ms'])} | {_f(r['step_ms'])} | {r['collectives_per_step']} | "
            f"{r['host_reads_per_step']} | {'yes' if r['planted_inf_skipped_consistently'] else '**no**'} |"
        )
    return [*lines, ""]


def _impls(results: Results) -> list[str]:
    lines = ["## Implementations", ""]
    lines += [f"- `{name}`: {label}" for name, label in results["impls"].items()]
    lines += [
        "- `sharded` (multi-rank, peer 3): ShardedGradScaler.unscale_ + torch.nn.utils.clip_grad_norm_ on DTensors"
    ]
    failures = [r for r in results["rows"] if r["status"] in ("error", "verify-failed")]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [
            f"- {r['scenario']} {r['variant']} `{r['impl']}`: {r['status']}: {r.get('detail')}"
            for r in failures
        ]
    return [*lines, ""]


def to_markdown(results: Results) -> str:
    parts = _header(results) + _targets(results) + _kernel_tables(results) + _steps(results)
    return "\n".join(parts + _multirank(results) + _impls(results))


def write(results: Results, out_dir: pathlib.Path, stem: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(to_markdown(results))
    return json_path, md_path


def summary(results: Results) -> str:
    """A short stdout view: clean rows (distscale vs best peer) and the targets."""
    lines = ["", "clean rows: device ms (distscale in-place / read-only; best peer)"]
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results["rows"]:
        if r["variant"] == "clean":
            by.setdefault(r["scenario"], {})[r["impl"]] = r
    for scen, rows in by.items():
        inplace, readonly = rows.get("distscale-inplace", {}), rows.get("distscale-readonly", {})
        peer = inplace.get("best_peer") or readonly.get("best_peer")
        lines.append(
            f"  {scen:<32} {_f(inplace.get('device_ms')):>9} / {_f(readonly.get('device_ms')):>9}   "
            f"{peer or '-'} {_f(inplace.get('best_peer_ms') or readonly.get('best_peer_ms'))}"
        )
    lines += ["", "targets:"]
    lines += [f"  {t['metric']:<52} {t['status']:<22} {t['measured']}" for t in results["targets"]]
    bad = [r for r in results["rows"] if r["status"] in ("error", "verify-failed")]
    lines.append(f"\nrows: {len(results['rows'])}, failed verification or errors: {len(bad)}")
    return "\n".join(lines)
