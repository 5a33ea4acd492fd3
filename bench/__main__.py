"""``python -m bench``: distscale and its peers side by side, verified, timed, checked against bench/PERF.md's targets (bench/targets.json).

    python -m bench                          # all scenarios at the device's sizes (CUDA if present)
    python -m bench --quick --out /tmp/b     # CPU smoke run, tiny sizes (well under a minute)
    python -m bench --scenarios S1,S4,step --impls distscale-inplace,torch-chain --reps 50

Writes ``<out>/<YYYY-MM-DD>-<device>[-quick][-<tag>].json`` and ``.md`` (default out: bench/results).
Scenario tokens: a group (S1..S5), a name or id (``S3:gpt2-124m``), ``step`` (full scaler step on
a small model) and ``multirank`` (FSDP2 on gloo ranks).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import torch

from bench import implementations, report, runner
from bench import scenarios as sc
from bench import steps as whole_steps
from bench.implementations import Impl
from bench.measure import copy_bandwidth

EXTRA_PARTS = ("step", "multirank")


@dataclass(frozen=True)
class Profile:
    """Sizes and repetitions for one kind of run."""

    name: str
    reps: int
    warmup: int
    budget_s: float
    copy_bytes: int
    step: dict[str, int]
    multirank: dict[str, int]
    world_size: int
    timeout_s: float
    # The same full step on a deep stack of tiny layers: where per-gradient host time dominates.
    step_many: dict[str, int] | None = None


PROFILES = {
    "gpu": Profile("gpu", 30, 3, 1.0, 2 << 30, {"width": 1024, "layers": 32, "batch": 64, "steps": 30},
                   {"width": 256, "layers": 8, "batch": 16, "warmup": 2, "steps": 20}, 4, 600.0,
                   {"width": 8, "layers": 2500, "batch": 8, "steps": 20}),
    "cpu": Profile("cpu", 15, 2, 1.0, 256 << 20, {"width": 256, "layers": 16, "batch": 32, "steps": 20},
                   {"width": 256, "layers": 8, "batch": 16, "warmup": 2, "steps": 20}, 4, 600.0,
                   {"width": 8, "layers": 500, "batch": 8, "steps": 10}),
    "quick": Profile("quick", 2, 1, 0.2, 16 << 20, {"width": 32, "layers": 4, "batch": 8, "steps": 3},
                     {"width": 32, "layers": 3, "batch": 4, "warmup": 2, "steps": 3}, 2, 120.0),
}  # fmt: skip


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes, few reps, 2 ranks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA if available (cpu with --quick)")  # fmt: skip
    p.add_argument("--scenarios", default="", help="comma-separated groups/names/ids, 'step', 'multirank'")
    p.add_argument("--impls", default="", help="comma-separated implementation names (kernel table)")
    p.add_argument("--variants", default="", help=f"comma-separated subset of {','.join(sc.VARIANTS)}")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    p.add_argument("--reps", type=int, default=None, help="timed reps per row (default: per profile)")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the multi-rank scenario")
    p.add_argument("--tag", default="", help="suffix of the result files (runs split over several calls)")
    return p.parse_args(argv)


def _split(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.device == "cuda" or (args.device == "auto" and not args.quick and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_cpu_name()})"


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU's name in lowercase words joined by dashes (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _load() -> float | None:
    """The host's 1-minute load average (other processes make CPU timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _triton_version() -> str:
    try:
        import triton
    except Exception:
        return "not installed"
    return triton.__version__


def select_impls(device: torch.device, names: list[str]) -> tuple[list[Impl], str]:
    """distscale rows (auto, plus triton where it runs) and the peers, filtered by ``names``."""
    has_triton, why = implementations.triton_available(device)
    impls = implementations.ours(implementations.kernel_names(device), device) + implementations.PEERS
    if names:
        known = {i.name for i in impls}
        unknown = sorted(set(names) - known)
        if unknown:
            raise SystemExit(f"unknown --impls {unknown}; choose from {sorted(known)}")
        impls = [i for i in impls if i.name in names]
    return impls, ("yes" if has_triton else f"no ({why})")


def select_scenarios(profile: str, tokens: list[str]) -> tuple[list[sc.Scenario], list[str]]:
    """The kernel scenarios and the extra parts ("step", "multirank") the tokens select."""
    all_scen = sc.scenarios(profile)
    if not tokens:
        return all_scen, list(EXTRA_PARTS)
    chosen = [s for s in all_scen if any(s.matches(t) for t in tokens)]
    extras = [p for p in EXTRA_PARTS if p in (t.lower() for t in tokens)]
    unknown = [t for t in tokens if t.lower() not in EXTRA_PARTS and not any(s.matches(t) for s in all_scen)]
    if unknown:
        names = ", ".join(s.id for s in all_scen)
        raise SystemExit(f"unknown --scenarios {unknown}; choose groups S1..S5, {names}, step, multirank")
    return chosen, extras


def _scenario_info(s: sc.Scenario) -> dict[str, Any]:
    return {
        "id": s.id,
        "group": s.group,
        "desc": s.desc,
        "n_tensors": s.n_tensors,
        "elements": s.elements,
        "grad_bytes": s.nbytes,
        "dtypes": s.dtype_names(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    device = _device(args)
    profile = PROFILES["quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")]
    reps = args.reps or profile.reps
    world = args.world_size or profile.world_size
    variants = _split(args.variants) or list(sc.VARIANTS)
    if set(variants) - set(sc.VARIANTS):
        raise SystemExit(f"unknown --variants; choose from {sc.VARIANTS}")
    scen_list, extras = select_scenarios(profile.name, _split(args.scenarios))
    impls, triton_rows = select_impls(device, _split(args.impls))

    print(
        f"distscale bench: {device_name(device)}, profile {profile.name}, torch {torch.__version__}",
        flush=True,
    )
    load_start = _load()
    copy = copy_bandwidth(device, profile.copy_bytes, reps=max(3, min(reps, 10)))
    print(f"copy bandwidth: {copy['gbs']:.1f} GB/s", flush=True)

    settings = runner.Settings(reps=reps, warmup=profile.warmup, budget_s=profile.budget_s)
    rows: list[dict[str, Any]] = []
    for scenario in scen_list:
        rows += runner.run_scenario(scenario, impls, variants, device, settings)
    runner.annotate(rows, copy["gbs"])

    steps: list[dict[str, Any]] = []
    if "step" in extras:
        for config in (profile.step, profile.step_many):
            if config is not None:
                steps += whole_steps.run_steps(device, **{**config, "steps": args.reps or config["steps"]})
    mr: dict[str, Any] | None = None
    if "multirank" in extras:
        try:
            mr = whole_steps.run_multirank(world, profile.multirank, timeout=profile.timeout_s)
        except Exception as exc:  # a failed multi-rank job is reported, not fatal
            mr = {"world_size": world, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  multirank: {mr['error']}", flush=True)

    date = datetime.date.today().isoformat()
    results: dict[str, Any] = {
        "meta": {
            "date": date,
            "device": device_name(device),
            "device_slug": device_slug(device),
            "device_type": device.type,
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "profile": profile.name,
            "quick": args.quick,
            "reps": reps,
            "warmup": profile.warmup,
            "variants": variants,
            "kernel_api": implementations.api_name(),
            "triton_rows": triton_rows,
            "copy_bandwidth": copy,
            "load_avg_1min": {"start": load_start, "end": _load()},
            "command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
        },
        "scenarios": [_scenario_info(s) for s in scen_list],
        "impls": {i.name: i.label for i in impls},
        "rows": rows,
        "steps": steps,
        "multirank": mr,
    }
    results["targets"] = report.evaluate(rows, steps, mr, device.type)
    stem = (
        f"{date}-{device_slug(device)}"
        + ("-quick" if args.quick else "")
        + (f"-{args.tag}" if args.tag else "")
    )
    json_path, md_path = report.write(results, args.out, stem)
    print(report.summary(results))
    print(f"\nwrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()
