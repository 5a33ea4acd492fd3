"""Per-step host time of the scaler's own work at many small gradients, against torch's scaler.

    python -m bench.hosttime [--tensors 1000 10000] [--numel 64] [--layouts separate,flat,ddp,...]
                             [--device cpu|cuda] [--out results.md]

Times the scaler region of a step on N gradients of ``numel`` elements, distscale against torch in
the same run: ``unscale_`` + ``update``, and the clip path (distscale's ``clip_grad_norm_`` +
``update`` against torch's ``unscale_`` + ``clip_grad_norm_(foreach=True)`` + ``update``), median
of 12 steps after warm-up. Layouts:

* ``separate``: a new, separately allocated grad per parameter every step;
* ``persistent``: the same grad tensors every step (``zero_grad(set_to_none=False)``);
* ``flat``: views of one flat buffer (a user's flat gradient buffer);
* ``ddp``: DDP with ``gradient_as_bucket_view=True`` on 2 gloo ranks (torch.amp.GradScaler);
* ``fsdp1``: FSDP1 with ``use_orig_params=True`` on 2 gloo ranks (ShardedGradScaler, FSDP's clip);
* ``fsdp2``: FSDP2 (``fully_shard``) on 2 gloo ranks (ShardedGradScaler, DTensor clip).

On 2 ranks each rank times its own region and the slower rank counts. On CPU the time is host and
compute together; the tensors are tiny, so the Python per gradient dominates. On CUDA the numbers
are host (enqueue) time: no synchronization inside. Targets (bench/PERF.md): at most 1.0x torch
for separate grads, at most 0.2x where grads tile few storages.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distscale

LAYOUTS = ("separate", "persistent", "flat", "ddp", "fsdp1", "fsdp2")
MULTI_RANK = ("ddp", "fsdp1", "fsdp2")
TARGET = {"separate": 1.0, "persistent": 1.0, "flat": 0.2, "ddp": 0.2, "fsdp1": 0.2, "fsdp2": 0.2}
STEPS, WARMUP = 12, 3


class _Params(nn.Module):
    """N parameters of ``numel`` elements and a forward that gives each a gradient."""

    def __init__(self, n: int, numel: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(w * x).sum() for w in self.weights]).sum()


def _torch_clip(model: nn.Module, params: list[torch.Tensor]) -> None:
    clip = getattr(model, "clip_grad_norm_", None)
    if callable(clip):  # FSDP1's own clip
        clip(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)


def _region(kind: str, clip: bool, scaler: Any, opt: torch.optim.Optimizer, model: nn.Module) -> float:
    params = [p for group in opt.param_groups for p in group["params"]]
    start = time.perf_counter()
    if kind == "distscale" and clip:
        scaler.clip_grad_norm_(opt, 1.0)
    else:
        scaler.unscale_(opt)
        if clip:
            _torch_clip(model, params)
    scaler.update()
    return time.perf_counter() - start


def _median_ms(times: list[float]) -> float:
    return statistics.median(times[WARMUP:]) * 1e3


def _one_process(layout: str, n: int, numel: int, kind: str, clip: bool, device: torch.device) -> float:
    params = [nn.Parameter(torch.randn(numel, device=device)) for _ in range(n)]
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = distscale.GradScaler(device.type) if kind == "distscale" else torch.amp.GradScaler(device.type)
    flat = torch.zeros(n * numel, device=device)
    if layout == "flat":
        for i, p in enumerate(params):
            p.grad = flat[i * numel : (i + 1) * numel]
    times = []
    for _ in range(WARMUP + STEPS):
        if layout == "separate":
            for p in params:
                p.grad = torch.randn(numel, device=device)
        elif layout == "persistent":
            for p in params:
                if p.grad is None:
                    p.grad = torch.randn(numel, device=device)
                else:
                    p.grad.normal_()
        else:
            flat.normal_()
        scaler.scale(torch.ones((), device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(_region(kind, clip, scaler, opt, nn.Module()))
    return _median_ms(times)


def _wrap(layout: str, model: nn.Module, rank: int, world: int) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def rank_job(rank: int, world: int, layout: str, n: int, numel: int) -> dict[tuple[str, bool], float]:
    """On one of the 2 gloo ranks: every (scaler, clip) variant's median region time, in ms."""
    out = {}
    for kind in ("distscale", "torch"):
        for clip in (False, True):
            model = _wrap(layout, _Params(n, numel), rank, world)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            if kind == "distscale":
                scaler: Any = distscale.GradScaler("cpu")
                scaler.register_model(model)
            elif layout == "ddp":
                scaler = torch.amp.GradScaler("cpu")
            else:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                scaler = ShardedGradScaler("cpu")
            x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
            times = []
            for _ in range(WARMUP + STEPS):
                opt.zero_grad(set_to_none=False)
                scaler.scale(model(x)).backward()
                times.append(_region(kind, clip, scaler, opt, model))
            out[(kind, clip)] = _median_ms(times)
    return out


def measure(layouts: list[str], sizes: list[int], numel: int, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for layout in layouts:
        for n in sizes:
            if layout in MULTI_RANK:
                from distscale.testing import run_ranks

                per_rank = run_ranks(rank_job, 2, layout, n, numel, timeout=900)
                measured = {key: max(r[key] for r in per_rank) for key in per_rank[0]}  # the slower rank
            else:
                for kind in ("distscale", "torch"):  # first calls pay imports and lazy initialization
                    _one_process(layout, 10, numel, kind, True, device)
                measured = {
                    (k, c): _one_process(layout, n, numel, k, c, device)
                    for k in ("distscale", "torch")
                    for c in (False, True)
                }
            for clip in (False, True):
                ours, theirs = measured[("distscale", clip)], measured[("torch", clip)]
                ratio = ours / theirs
                rows.append(
                    {
                        "layout": layout,
                        "tensors": n,
                        "path": "clip + update" if clip else "unscale_ + update",
                        "distscale_ms": ours,
                        "torch_ms": theirs,
                        "ratio": ratio,
                        "target": TARGET[layout],
                        "met": ratio <= TARGET[layout],
                    }
                )
    return rows


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| layout | tensors | path | distscale ms | torch ms | ratio | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['tensors']} | {r['path']} | {r['distscale_ms']:.2f} | {r['torch_ms']:.2f} | "
            f"{r['ratio']:.2f} | ≤ {r['target']:g} | {'met' if r['met'] else 'missed'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--numel", type=int, default=64)
    p.add_argument(
        "--layouts", default="separate,persistent", help=f"comma-separated, of {', '.join(LAYOUTS)}"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        p.error(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    device = torch.device(args.device)
    if device.type != "cpu" and any(x in MULTI_RANK for x in layouts):
        p.error("the 2-rank layouts (ddp, fsdp1, fsdp2) run on CPU gloo ranks: pass --device cpu")
    header = (
        f"torch {torch.__version__}, {device}; median ms per step (of {STEPS}, after {WARMUP} warm-up) of the "
        f"scaler region on {args.numel}-element gradients; ratio = distscale / torch in the same run"
    )
    table = to_markdown(measure(layouts, args.tensors, args.numel, device), header)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
