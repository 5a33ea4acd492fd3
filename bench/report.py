"""One run's report: ``<stem>.json`` (everything), ``<stem>.md`` (tables), a stdout summary, and
the targets of ``bench/targets.json`` evaluated from its numbers (met / missed, with the value).

Ratio targets use clean rows of memory-bound lists (P ≥ 100M elements; on CPU runs, whose lists
are small, the S1/S2 lists) and report the worst case; for each row the fastest distscale kernel
of the mode counts (named in the detail). GPU-only targets (device time against the floor and the
peers, enqueue time, scratch memory) say "not applicable (CPU)" on CPU runs and still show what
was measured there.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------------- report

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
        "## Targets (bench/PERF.md, bench/targets.json)",
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


# ---------------------------------------------------------------------------- targets

TARGETS_FILE = pathlib.Path(__file__).with_name("targets.json")
TARGETS: dict[str, Any] = json.loads(TARGETS_FILE.read_text())
NA_CPU = "not applicable (CPU)"
NOT_MEASURED = "not measured"

Row = dict[str, Any]


def _ok(row: Row) -> bool:
    return row.get("status") == "ok" and row.get("device_ms") is not None


def _best_ours(rows: list[Row], scenario: str, variant: str, mode: str) -> Row | None:
    cands = [r for r in rows if r["family"] == "distscale" and r["mode"] == mode and r["scenario"] == scenario
             and r["variant"] == variant and _ok(r)]  # fmt: skip
    return min(cands, key=lambda r: r["device_ms"]) if cands else None


def _peer(rows: list[Row], scenario: str, variant: str, name: str) -> Row | None:
    for r in rows:
        if r["impl"] == name and r["scenario"] == scenario and r["variant"] == variant and _ok(r):
            return r
    return None


def _scenarios(rows: list[Row], keep: Callable[[Row], bool]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        if r["variant"] == "clean" and keep(r):
            seen[r["scenario"]] = None
    return list(seen)


def _result(metric: str, target: str, status: str, measured: str, detail: str = "") -> dict[str, str]:
    return {"metric": metric, "target": target, "status": status, "measured": measured, "detail": detail}


def _gpu_status(ok: bool, cpu: bool) -> str:
    return NA_CPU if cpu else ("met" if ok else "missed")


def _memory_bound(cpu: bool) -> Callable[[Row], bool]:
    if cpu:
        return lambda r: r["group"] in ("S1", "S2")
    return lambda r: r["elements"] >= TARGETS["memory_bound_elements"]


def _floor(rows: list[Row], cpu: bool) -> dict[str, str]:
    spec = TARGETS["floor"]
    metric, target = spec["metric"], f"≤ {spec['max_x_floor']:g} × floor"
    worst: tuple[float, str] | None = None
    for scen in _scenarios(rows, _memory_bound(cpu)):
        for mode in ("inplace", "readonly"):
            ours = _best_ours(rows, scen, "clean", mode)
            if ours is not None and ours.get("x_floor") is not None:
                cand = (ours["x_floor"], f"{scen}, {ours['impl']}")
                worst = cand if worst is None or cand[0] > worst[0] else worst
    if worst is None:
        return _result(metric, target, NA_CPU if cpu else NOT_MEASURED, "-", "no clean row with P ≥ 100M")
    return _result(
        metric,
        target,
        _gpu_status(worst[0] <= spec["max_x_floor"], cpu),
        f"{worst[0]:.2f} × floor (worst)",
        worst[1],
    )


def _vs_peer(rows: list[Row], cpu: bool, metric: str, peer: str, mode: str, need: float) -> dict[str, str]:
    target = f"≥ {need:g} × faster"
    worst: tuple[float, str] | None = None
    for scen in _scenarios(rows, _memory_bound(cpu)):
        ours, theirs = _best_ours(rows, scen, "clean", mode), _peer(rows, scen, "clean", peer)
        if ours is not None and theirs is not None:
            cand = (theirs["device_ms"] / ours["device_ms"], f"{scen}, {ours['impl']} vs {peer}")
            worst = cand if worst is None or cand[0] < worst[0] else worst
    if worst is None:
        return _result(metric, target, NA_CPU if cpu else NOT_MEASURED, "-", "no clean row with P ≥ 100M")
    return _result(metric, target, _gpu_status(worst[0] >= need, cpu), f"{worst[0]:.2f} × (worst)", worst[1])


def _host(rows: list[Row], cpu: bool) -> dict[str, str]:
    spec = TARGETS["host"]
    metric, target = spec["metric"], f"≤ {spec['max_ratio']:.2f} × torch foreach ({spec['peer']})"
    worst: tuple[float, str] | None = None
    for scen in _scenarios(rows, lambda r: r["group"] == "S4" and 1000 <= r["n_tensors"] <= 10_000):
        ours, theirs = _best_ours(rows, scen, "clean", "inplace"), _peer(rows, scen, "clean", spec["peer"])
        if ours is None or theirs is None or ours.get("host_ms") is None or theirs.get("host_ms") is None:
            continue
        cand = (ours["host_ms"] / theirs["host_ms"], f"{scen}, {ours['impl']}")
        worst = cand if worst is None or cand[0] > worst[0] else worst
    if worst is None:
        return _result(metric, target, NA_CPU if cpu else NOT_MEASURED, "-",
                       "host time is measured on CUDA only" if cpu else "no S4 row with 1k–10k tensors")  # fmt: skip
    return _result(
        metric,
        target,
        _gpu_status(worst[0] <= spec["max_ratio"], cpu),
        f"{worst[0]:.2f} × torch (worst)",
        worst[1],
    )


def _syncs(rows: list[Row], steps: list[Row]) -> dict[str, str]:
    spec = TARGETS["syncs"]
    metric, target = (
        spec["metric"],
        f"{spec['max_fused']} with fused optimizers; ≤ {spec['max_other']} otherwise",
    )
    ours = [r for r in steps if r["scaler"] == "distscale"]
    kernel = [r["syncs"] for r in rows if r["family"] == "distscale" and r.get("syncs") is not None]
    if not ours:
        return _result(metric, target, NOT_MEASURED, "-", "full-step scenario not run")
    fused = max(r["syncs"] for r in ours if r["optimizer"] != "sgd")
    plain = max(r["syncs"] for r in ours if r["optimizer"] == "sgd")
    kernel_max = max(kernel, default=0)
    ok = fused <= spec["max_fused"] and plain <= spec["max_other"] and kernel_max <= spec["max_fused"]
    measured = f"fused {fused}, non-fused {plain}, kernel rows {kernel_max}"
    return _result(
        metric, target, "met" if ok else "missed", measured, "distscale.GradScaler full step + kernel rows"
    )


def _collectives(multirank: dict[str, Any] | None) -> dict[str, str]:
    spec = TARGETS["collectives"]
    metric, target = spec["metric"], str(spec["per_step"])
    ours = _multirank_row(multirank, "distscale")
    if ours is None:
        return _result(metric, target, NOT_MEASURED, "-", "multi-rank scenario not run")
    assert multirank is not None  # it has rows
    n = ours["collectives_per_step"]
    return _result(
        metric,
        target,
        "met" if n == spec["per_step"] else "missed",
        str(n),
        f"FSDP2, {multirank['world_size']} gloo ranks",
    )


def _scratch(rows: list[Row], cpu: bool) -> dict[str, str]:
    spec = TARGETS["scratch"]
    metric, target = spec["metric"], "O(number of blocks), never O(P)"
    worst: tuple[float, str] | None = None
    for r in rows:
        if (
            r["family"] == "distscale"
            and r.get("scratch_bytes") is not None
            and r["elements"] >= spec["min_elements"]
        ):
            budget = (
                spec["fixed_bytes"] + r["elements"] * spec["bytes_per_element"]
            )  # one fp32 per 256 elements
            cand = (
                r["scratch_bytes"] / budget,
                f"{r['scenario']} {r['variant']}, {r['impl']}: {r['scratch_bytes']} B",
            )
            worst = cand if worst is None or cand[0] > worst[0] else worst
    if worst is None:
        return _result(metric, target, NA_CPU if cpu else NOT_MEASURED, "-", "CUDA allocator statistics only")
    return _result(metric, target, _gpu_status(worst[0] <= 1.0, cpu), f"{worst[0]:.2f} of budget (worst)",
                   worst[1] + f"; budget {spec['fixed_bytes']} B + P × {spec['bytes_per_element']:g} B")  # fmt: skip


def _multirank_row(multirank: dict[str, Any] | None, kind: str) -> Row | None:
    if not multirank or "rows" not in multirank:
        return None
    return next((r for r in multirank["rows"] if r["scaler"] == kind), None)


def _cpu_multirank(multirank: dict[str, Any] | None) -> dict[str, str]:
    spec = TARGETS["cpu_multirank"]
    metric, target = spec["metric"], "faster than ShardedGradScaler + FSDP clip_grad_norm_"
    ours, theirs = _multirank_row(multirank, "distscale"), _multirank_row(multirank, spec["peer"])
    if ours is None or theirs is None:
        return _result(metric, target, NOT_MEASURED, "-", "multi-rank scenario not run")
    assert multirank is not None  # it has rows
    ratio = theirs["region_ms"] / ours["region_ms"]
    detail = f"{ours['region_ms']:.2f} vs {theirs['region_ms']:.2f} ms/step, {multirank['world_size']} ranks"
    return _result(
        metric, target, "met" if ratio > spec["min_speedup"] else "missed", f"{ratio:.2f} × faster", detail
    )


def evaluate(
    rows: list[Row], steps: list[Row], multirank: dict[str, Any] | None, device_type: str
) -> list[dict[str, str]]:
    """Every target of ``targets.json``, in bench/PERF.md's order."""
    cpu = device_type != "cuda"
    return [
        _floor(rows, cpu),
        *(
            _vs_peer(rows, cpu, v["metric"], v["peer"], v["mode"], v["min_speedup"])
            for v in TARGETS["vs_peers"]
        ),
        _host(rows, cpu),
        _syncs(rows, steps),
        _collectives(multirank),
        _scratch(rows, cpu),
        _cpu_multirank(multirank),
    ]
