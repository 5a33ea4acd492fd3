"""The kernel table: every implementation on every (scenario, variant), verified, then timed.

Per (scenario, variant) the list is filled once for the float64 reference; per implementation it
is filled again, built, run once to warm up, refilled, run once under the sync counter (and, on
CUDA, the scratch-memory meter), verified against the reference, then timed. Inverse scales alternate between 0.5 and 2 so values
neither grow nor shrink over reps; implementations that write are refilled before every rep on
planted rows (a clip by an inf norm zeroes the list). Verification failures and exceptions become
the row's status, never hidden; such rows are excluded from "best peer".
"""

from __future__ import annotations

import gc
import math
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from bench import measure
from bench import scenarios as sc
from bench.implementations import Context, Impl, Outcome, Scale
from bench.measure import flush_buffer, scratch_bytes, synchronize, time_call
from distscale.testing import count_syncs

RTOL = 1e-3
VERIFY_INV = 0.5
TIMING_INVS = (2.0, 0.5)


@dataclass(frozen=True)
class Settings:
    reps: int
    warmup: int
    budget_s: float
    max_norm: float = 1.0


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.double().sum().cpu())
    return float(value)


def _found(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_found(v) for v in value)
    return _to_float(value) != 0.0


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-30)


def verify(
    impl: Impl, out: Outcome, grads: list[torch.Tensor], ref: sc.Reference, max_norm: float
) -> tuple[bool, str, dict]:
    """Check found_inf, the returned norm and what was written against the float64 reference."""
    found = _found(out.found_inf)
    values: dict[str, Any] = {"found_inf": found, "norm": None if out.norm is None else _to_float(out.norm)}
    problems = []
    if found != ref.found_inf:
        problems.append(f"found_inf={found}, expected {ref.found_inf}")
    if not ref.found_inf:
        if impl.norm_kind is not None:
            want = ref.norm if impl.norm_kind == "scaled" else ref.norm * VERIFY_INV
            if values["norm"] is None or not _rel(values["norm"], want) <= RTOL:
                problems.append(f"norm={values['norm']}, expected {want:.6g}")
        want_after = ref.norm * impl.factor(ref.norm, VERIFY_INV, max_norm)
        after = sc.norm64(grads)
        values["norm_after"] = after
        if not _rel(after, want_after) <= RTOL:
            problems.append(f"gradient norm afterwards {after:.6g}, expected {want_after:.6g}")
    return not problems, "; ".join(problems), values


def measure_row(impl: Impl, variant: str, grads: list[torch.Tensor], ref: sc.Reference, ctx: Context,
            settings: Settings, flush: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
    """One row: build, run once counted and verified, then time."""
    row: dict[str, Any] = {"impl": impl.name, "family": impl.family, "mode": impl.mode, "status": "ok"}
    sc.fill_(grads, variant)
    try:
        run = impl.build(grads, ctx)
        verify_scale = Scale.of(VERIFY_INV, ctx.device)
        run(verify_scale)  # warm (lazy init, JIT, autotuning) outside the counted, verified call
        sc.fill_(grads, variant)
        with count_syncs(ctx.device) as syncs, scratch_bytes(ctx.device) as scratch:
            out = run(verify_scale)
        synchronize(ctx.device)
        row["syncs"] = sum(syncs.values())
        row["sync_kinds"] = dict(syncs)
        row["scratch_bytes"] = scratch["bytes"]
        ok, detail, values = verify(impl, out, grads, ref, ctx.max_norm)
        row.update(values)
        row["verified"] = ok
        if not ok:
            row["status"] = "verify-failed"
            row["detail"] = detail
        scales = [Scale.of(inv, ctx.device) for inv in TIMING_INVS]
        refill = (lambda: sc.fill_(grads, variant)) if impl.mutates and ref.found_inf else None
        timing = time_call(lambda i: run(scales[i % 2]), ctx.device, reps=settings.reps, warmup=settings.warmup,
                           before_each=refill, flush=flush, budget_s=settings.budget_s)  # fmt: skip
    except Exception as exc:  # a failing implementation is a result, not a crash
        row.update(
            status="error", verified=False, detail=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        )
        row["traceback"] = traceback.format_exc(limit=4)
        return row
    overflow = ref.found_inf
    nbytes = impl.traffic(measure.Sizes.of(grads), overflow)
    row.update(device_ms=timing.device_ms, device_ms_min=timing.device_ms_min, host_ms=timing.host_ms,
               reps=timing.reps, bytes=nbytes, gbs=measure.gbs(nbytes, timing.device_ms))  # fmt: skip
    return row


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def memory_needed(scenario: sc.Scenario, device: torch.device) -> int:
    """The list, fp64 temporaries of its largest tensor (reference, DeepSpeed) and headroom."""
    headroom = (2 << 30) if device.type == "cuda" else (512 << 20)
    return scenario.nbytes + 12 * scenario.largest_tensor_elements + headroom


def run_scenario(scenario: sc.Scenario, impls: list[Impl], variants: list[str], device: torch.device,
                 settings: Settings, log: Any = print) -> list[dict[str, Any]]:  # fmt: skip
    """All rows of one scenario (skipped rows when the device has too little free memory)."""
    base = {"scenario": scenario.id, "group": scenario.group, "n_tensors": scenario.n_tensors,
            "elements": scenario.elements, "grad_bytes": scenario.nbytes}  # fmt: skip
    need, free = memory_needed(scenario, device), _available_bytes(device)
    if need > free:
        reason = f"skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        log(f"  {scenario.id}: {reason}")
        return [{**base, "variant": v, "impl": i.name, "family": i.family, "mode": i.mode, "status": "skipped",
                 "verified": None, "detail": reason} for v in variants for i in impls]  # fmt: skip
    ctx = Context(device, settings.max_norm)
    flush = flush_buffer(device)
    grads = sc.allocate(scenario, device)
    rows = []
    try:
        for variant in variants:
            sc.fill_(grads, variant)
            ref = sc.reference(grads)
            for impl in impls:
                row = {**base, "variant": variant, "ref_found_inf": ref.found_inf,
                       "ref_norm": None if math.isnan(ref.norm) else ref.norm,
                       **measure_row(impl, variant, grads, ref, ctx, settings, flush)}  # fmt: skip
                rows.append(row)
                ms = row.get("device_ms")
                timing = f"{ms:9.3f} ms" if ms is not None else f"{row['status']}: {row.get('detail', '')}"
                log(f"  {scenario.id:<32} {variant:<10} {impl.name:<26} {timing}")
    finally:
        del grads, flush
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def annotate(rows: list[dict[str, Any]], copy_gbs: float) -> None:
    """Add % of copy bandwidth, the floor (distscale rows) and the ratio to the best peer, in place."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["family"] == "peer" and row["status"] == "ok":
            key = (row["scenario"], row["variant"])
            if key not in best or row["device_ms"] < best[key]["device_ms"]:
                best[key] = row
    for row in rows:
        if row.get("device_ms") is None:
            continue
        row["pct_copy_bw"] = measure.pct_of(row["gbs"], copy_gbs)
        if row["family"] == "distscale":
            row["floor_ms"] = measure.floor_ms(row["bytes"], copy_gbs)
            row["x_floor"] = row["device_ms"] / row["floor_ms"]
        peer = best.get((row["scenario"], row["variant"]))
        if peer is not None:
            row["best_peer"] = peer["impl"]
            row["best_peer_ms"] = peer["device_ms"]
            row["speedup_vs_best_peer"] = peer["device_ms"] / row["device_ms"]
