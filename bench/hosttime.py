"""Per-step host time of the scaler's own work at many small gradients, against torch's scaler.

    python -m bench.hosttime [--tensors 1000 10000] [--numel 64] [--device cpu|cuda]

Times ``unscale_`` + ``update`` (and, with clipping, distscale's ``clip_grad_norm_`` against
torch's ``unscale_`` + ``clip_grad_norm_(foreach=True)``) on N gradients of ``numel`` elements,
median of 12 steps. On CPU this is host and compute together; the tensors are tiny so the Python
per gradient dominates. On CUDA the numbers are host (enqueue) time: no synchronization inside.
"""

from __future__ import annotations

import argparse
import time

import torch

import distscale


def _median_ms(n: int, numel: int, kind: str, clip: bool, device: torch.device, persistent: bool) -> float:
    params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(n)]
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = distscale.GradScaler(device.type) if kind == "distscale" else torch.amp.GradScaler(device.type)
    times = []
    for _ in range(12):
        for p in params:
            if persistent and p.grad is not None:
                p.grad.normal_()  # zero_grad(set_to_none=False) + backward: same tensors, new values
            else:
                p.grad = torch.randn(numel, device=device)
        scaler.scale(torch.ones((), device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if isinstance(scaler, distscale.GradScaler) and clip:
            scaler.clip_grad_norm_(opt, 1.0)
        else:
            scaler.unscale_(opt)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        scaler.update()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--numel", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--persistent", action="store_true", help="keep the grad tensors across steps (set_to_none=False)"
    )
    args = p.parse_args()
    device = torch.device(args.device)
    grads = "the same grad tensors every step" if args.persistent else "new grad tensors every step"
    print(
        f"torch {torch.__version__}, {device}; median ms per step of {args.numel}-element gradients, {grads}\n"
    )
    for kind in ("distscale", "torch"):  # first calls pay imports and lazy initialization
        _median_ms(10, args.numel, kind, True, device, args.persistent)
    print("| tensors | path | distscale | torch | ratio |\n|---|---|---|---|---|")
    for n in args.tensors:
        for clip in (False, True):
            ours = _median_ms(n, args.numel, "distscale", clip, device, args.persistent)
            theirs = _median_ms(n, args.numel, "torch", clip, device, args.persistent)
            path = "clip" if clip else "unscale_"
            print(f"| {n} | {path} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
