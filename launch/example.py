"""A small runnable example: FSDP2 (or DDP) fp16 training on CPU ranks with distscale.GradScaler.

    torchrun --standalone --nproc_per_node=2 launch/example.py            # FSDP2, 2 CPU ranks
    torchrun --standalone --nproc_per_node=2 launch/example.py --ddp
    python launch/example.py                                               # one process

Rank 1 gets an inf planted in its *local* gradient shard at step 5: every rank skips that step
and backs off together, with one collective per step. (The full main job is launch/train.py,
built by the launch issue.)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from distscale import GradScaler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ddp", action="store_true", help="wrap with DDP instead of FSDP2")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    if distributed and args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    elif distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
    scaler.register_model(model)  # DDP's process group, for the clip norm (FSDP2's DTensors tell theirs)
    gen = torch.Generator().manual_seed(rank)
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(42))
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), x @ w_true)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 5 and rank == world - 1:
            grad = next(p for p in model.parameters() if p.grad is not None).grad
            getattr(grad, "_local_tensor", grad).view(-1)[0] = float("inf")  # this rank's shard only
        norm = scaler.clip_grad_norm_(opt, max_norm=10.0)
        scaler.step(opt)
        scaler.update()
        if rank == 0:
            print(
                f"step {step:2d}  loss {loss.item():8.4f}  grad norm {norm.item():9.4f}  scale {scaler.get_scale():7.0f}"
            )
    state = scaler.state_dict()["state"]
    print(
        f"rank {rank}: scale {state['scale']:.0f}, skipped {state['num_skipped']} of {state['num_updates']} steps"
    )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
