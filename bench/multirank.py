"""CPU multi-rank scenario: the full scaler step with clipping on an FSDP2 (``fully_shard``) model.

On N gloo ranks (spawned, with a timeout), the same model, data and seed for:

- ``distscale``: ``distscale.GradScaler.clip_grad_norm_`` → ``step`` → ``update``;
- ``sharded`` (peer 3): ``ShardedGradScaler.unscale_`` → ``torch.nn.utils.clip_grad_norm_`` on the
  DTensor gradients (which all-reduces the norm) → ``step`` → ``update``.

Measured per step: the scaler region's wall time (max over ranks, median over steps), the whole
step's time, and — on separate, untimed steps under the profiler — backend collectives and host
reads in the region. A final step plants an inf into one rank's local shard: every rank of both
scalers must skip it and agree on the scale.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

KINDS = ("distscale", "sharded")
MAX_NORM = 1.0


def _build(width: int, layers: int, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _scaler(kind: str) -> Any:
    import distscale

    if kind == "distscale":
        return distscale.GradScaler("cpu")
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler("cpu")


def _plant(model: nn.Module) -> None:
    for p in model.parameters():
        local = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad
        if local.numel():
            local.view(-1)[0] = float("inf")
            return


def job(rank: int, world: int, cfg: dict[str, int]) -> dict[str, Any]:
    """Runs on every rank: both scalers, warm-up + counted + timed steps + one planted step."""
    from bench.counting import count_collectives, count_syncs

    out: dict[str, Any] = {}
    for kind in KINDS:
        model = _build(cfg["width"], cfg["layers"], world)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        scaler = _scaler(kind)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(cfg["batch"], cfg["width"], generator=gen)

        def backward(plant: bool = False, *, model=model, opt=opt, scaler=scaler, x=x) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            if plant:
                _plant(model)

        def region(*, kind=kind, opt=opt, scaler=scaler, params=params) -> None:
            if kind == "distscale":
                scaler.clip_grad_norm_(opt, MAX_NORM)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            scaler.step(opt)
            scaler.update()

        colls: list[int] = []
        reads: list[int] = []
        for _ in range(cfg["warmup"]):
            backward()
            with count_collectives() as c, count_syncs(torch.device("cpu")) as s:
                region()
            colls.append(sum(c.values()))
            reads.append(sum(s.values()))
        region_ms, step_ms = [], []
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            backward()
            t1 = time.perf_counter()
            region()
            t2 = time.perf_counter()
            region_ms.append((t2 - t1) * 1e3)
            step_ms.append((t2 - t0) * 1e3)
        scale_before = scaler.get_scale()
        backward(plant=rank == world - 1)
        region()
        out[kind] = {
            "region_ms": region_ms,
            "step_ms": step_ms,
            "collectives": colls,
            "host_reads": reads,
            "scale_before_plant": scale_before,
            "scale_after_plant": scaler.get_scale(),
        }
    return out


def summarize(results: list[dict[str, Any]], world: int, cfg: dict[str, int]) -> dict[str, Any]:
    """Per scaler: ms/step (per-step max over ranks, then median), collectives and reads per step."""
    rows = []
    for kind in KINDS:
        per_rank = [r[kind] for r in results]
        steps = len(per_rank[0]["region_ms"])
        region = [max(r["region_ms"][i] for r in per_rank) for i in range(steps)]
        full = [max(r["step_ms"][i] for r in per_rank) for i in range(steps)]
        scales_after = {r["scale_after_plant"] for r in per_rank}
        skipped = all(r["scale_after_plant"] == r["scale_before_plant"] * 0.5 for r in per_rank)
        rows.append({
            "scaler": kind,
            "region_ms": statistics.median(region),
            "step_ms": statistics.median(full),
            "collectives_per_step": max(r["collectives"][-1] for r in per_rank),
            "host_reads_per_step": max(r["host_reads"][-1] for r in per_rank),
            "planted_inf_skipped_consistently": skipped and len(scales_after) == 1,
        })  # fmt: skip
    return {"world_size": world, "backend": "gloo", "model": cfg, "rows": rows}


def run(world: int, cfg: dict[str, int], timeout: float, log: Any = print) -> dict[str, Any]:
    """Spawn ``world`` gloo ranks (tests/_dist.py's harness) and summarize their measurements."""
    from tests._dist import run_ranks

    result = summarize(run_ranks(job, world, cfg, timeout=timeout), world, cfg)
    for row in result["rows"]:
        log(f"  multirank x{world} {row['scaler']:<10} {row['region_ms']:9.3f} ms/step (scaler region)  "
            f"{row['collectives_per_step']} coll  {row['host_reads_per_step']} reads")  # fmt: skip
    return result
