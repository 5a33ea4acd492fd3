"""Whole scaler steps against torch's: on one process (``fullstep``) and on N gloo ranks (``multirank``).

**One process.** Same model, data and seed for both; fp16 autocast forward and backward run untimed, then the
timed region is the scaler's part of the step with clipping:

- distscale: ``clip_grad_norm_(opt, max_norm)`` → ``step`` → ``update``
- distscale+rules: the same with the norm and loss spike rules on (what the skip rules cost)
- torch:     ``unscale_(opt)`` → ``torch.nn.utils.clip_grad_norm_(foreach=True)`` → ``step`` → ``update``

with SGD (momentum; the step needs a skip decision on the host) and AdamW(fused=True) (the skip
decision stays on the device). Host syncs are counted on a separate, untimed step. After the run
the two scalers must agree on the scale and (closely) on the parameters.

**N ranks.** On N gloo ranks (spawned, with a timeout), the same model, data and seed for:

- ``distscale``: ``distscale.GradScaler.clip_grad_norm_`` → ``step`` → ``update``;
- ``sharded`` (peer 3): ``ShardedGradScaler.unscale_`` → ``torch.nn.utils.clip_grad_norm_`` on the
  DTensor gradients (which all-reduces the norm) → ``step`` → ``update``.

Measured per step: the scaler region's wall time (max over ranks, median over steps), the whole
step's time, and — on separate, untimed steps under the profiler — backend collectives and host
reads in the region. A final step plants an inf into one rank's local shard: every rank of both
scalers must skip it and agree on the scale.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from typing import Any

import torch
from torch import nn

import distscale
from bench.measure import synchronize, time_call
from distscale.testing import count_syncs

# ---------------------------------------------------------------------------- fullstep

OPTIMIZERS = ("sgd", "adamw-fused")
SCALERS = ("distscale", "distscale+rules", "torch")
# The skip rules' cost: norm and loss spike rules on (no step spikes here, so none fires).
RULES: dict[str, Any] = {"skip_grad_norm_sigma": 6.0, "skip_loss_sigma": 6.0}
MAX_NORM = 1.0


def _model(width: int, layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1]).to(device)


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


class _Trainer:
    """One (optimizer, scaler) pair on its own copy of the model."""

    def __init__(
        self, base: nn.Module, opt_kind: str, scaler_kind: str, device: torch.device, batch: int
    ) -> None:
        self.model = copy.deepcopy(base)
        self.params = list(self.model.parameters())
        self.opt = _optimizer(opt_kind, self.model)
        if scaler_kind == "torch":
            self.scaler: Any = torch.amp.GradScaler(device.type)
        else:
            self.scaler = distscale.GradScaler(
                device.type, **(RULES if scaler_kind == "distscale+rules" else {})
            )
        self.kind = scaler_kind
        self.device = device
        gen = torch.Generator(device=device).manual_seed(1)
        width = self.params[0].shape[1]
        self.x = torch.randn(batch, width, device=device, generator=gen)

    def backward(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        with torch.autocast(self.device.type, dtype=torch.float16):
            loss = self.model(self.x).float().square().mean()
        self.scaler.scale(loss).backward()

    def region(self) -> None:
        if isinstance(self.scaler, distscale.GradScaler):
            self.scaler.clip_grad_norm_(self.opt, MAX_NORM)
        else:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()

    def step(self) -> None:
        self.backward()
        self.region()


def _region(trainer: _Trainer, _rep: int) -> None:
    trainer.region()


def run_steps(device: torch.device, *, width: int, layers: int, batch: int, steps: int, warmup: int = 2,
              log: Any = print) -> list[dict[str, Any]]:  # fmt: skip
    """Rows (optimizer, scaler): region device/host ms, host syncs per step, and the agreement check."""
    base = _model(width, layers, device)
    rows = []
    for opt_kind in OPTIMIZERS:
        trainers = {kind: _Trainer(base, opt_kind, kind, device, batch) for kind in SCALERS}
        timings, syncs = {}, {}
        for kind, tr in trainers.items():
            for _ in range(warmup):
                tr.step()
            tr.backward()
            with count_syncs(device) as counted:
                tr.region()
            synchronize(device)
            syncs[kind] = sum(counted.values())
            timings[kind] = time_call(functools.partial(_region, tr), device, reps=steps, warmup=0,
                                      before_each=tr.backward)  # fmt: skip
        scales = {k: tr.scaler.get_scale() for k, tr in trainers.items()}
        diffs = {
            kind: max(
                float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach().cpu())
                for a, b in zip(trainers[kind].params, trainers["torch"].params, strict=True)
            )
            for kind in SCALERS
        }
        diff = max(diffs.values())
        agree = len(set(scales.values())) == 1 and diff <= 1e-3
        for kind in SCALERS:
            t = timings[kind]
            rows.append({
                "optimizer": opt_kind, "scaler": kind, "n_tensors": len(trainers[kind].params),
                "elements": sum(p.numel() for p in trainers[kind].params),
                "device_ms": t.device_ms, "host_ms": t.host_ms, "reps": t.reps, "syncs": syncs[kind],
                "scale": scales[kind], "verified": agree, "max_rel_param_diff": diff,
            })  # fmt: skip
            log(f"  step {opt_kind:<12} {kind:<10} {t.device_ms:9.3f} ms  syncs {syncs[kind]}  agree={agree}")
    return rows


# ---------------------------------------------------------------------------- multirank

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
        if p.grad is None:
            continue
        local = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad
        if local.numel():
            local.view(-1)[0] = float("inf")
            return


def multirank_job(rank: int, world: int, cfg: dict[str, int]) -> dict[str, Any]:
    """Runs on every rank: both scalers, warm-up + counted + timed steps + one planted step."""
    from distscale.testing import count_collectives, count_syncs

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


def summarize_multirank(results: list[dict[str, Any]], world: int, cfg: dict[str, int]) -> dict[str, Any]:
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


def run_multirank(world: int, cfg: dict[str, int], timeout: float, log: Any = print) -> dict[str, Any]:
    """Spawn ``world`` gloo ranks (tests/_dist.py's harness) and summarize their measurements."""
    from distscale.testing import run_ranks

    result = summarize_multirank(run_ranks(multirank_job, world, cfg, timeout=timeout), world, cfg)
    for row in result["rows"]:
        log(f"  multirank x{world} {row['scaler']:<10} {row['region_ms']:9.3f} ms/step (scaler region)  "
            f"{row['collectives_per_step']} coll  {row['host_reads_per_step']} reads")  # fmt: skip
    return result
