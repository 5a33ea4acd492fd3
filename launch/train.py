"""The distscale main job: a small GPT trained with fp16 loss scaling on any launcher.

    python launch/train.py                                             # one process, CPU
    torchrun --standalone --nproc_per_node=2 launch/train.py           # FSDP2 on 2 ranks
    mpirun -np 2 python launch/train.py --parallel ddp                 # Open MPI (+ mpi4py)
    srun python launch/train.py                                        # inside a Slurm allocation
    sbatch slurm/train.sbatch                                          # multi-node template
    torchrun --standalone --nproc_per_node=2 launch/train.py --policy deepspeed   # another rule
    torchrun --standalone --nproc_per_node=2 launch/train.py --parallel pp        # 2 pipeline stages
    torchrun --standalone --nproc_per_node=4 launch/train.py --parallel pp_fsdp   # 2 stages x FSDP2(2)

CPU + gloo is the embedded default; CUDA + NCCL when GPUs are present. The data is a synthetic
Markov language generated from (seed, step), so runs are reproducible on any number of ranks.
Checkpoints (model, optimizer, scaler, step, seeds) go through torch.distributed.checkpoint and
are written atomically; ``--resume auto`` continues from the latest one exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/ siblings, when run as a script

import ckpt
from gpt import GPT, Block, GPTConfig, GPTStage, MarkovLanguage

from distscale import GradScaler
from distscale.env import init_distributed
from distscale.errors import FaultError
from distscale.sinks import JsonlSink, MetricsLogger, MetricsSink, TensorBoardSink

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The scaling rules the job can run: torch's, the presets that reproduce the peers' rules, and
# distscale's amax-guided rule.
POLICIES = ("torch", "deepspeed", "megatron", "fairseq", "amax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parallel",
        choices=["fsdp", "fsdp1", "ddp", "hsdp", "pp", "pp_fsdp"],
        default="fsdp",
        help="fsdp = FSDP2; pp = pipeline stages (torch.distributed.pipelining), DDP over the ranks "
        "that hold the same stage; pp_fsdp = pipeline stages, each sharded by FSDP2",
    )
    p.add_argument("--pp-size", type=int, default=2, help="pipeline stages (--parallel pp, pp_fsdp)")
    p.add_argument("--pp-schedule", choices=["gpipe", "1f1b"], default="1f1b")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per step (pipeline)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences per step)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="fp16", help="autocast dtype (fp16 uses the scaler)"
    )
    p.add_argument("--optimizer", choices=["adamw", "adamw_fused", "sgd"], default="adamw_fused")
    p.add_argument("--clip", type=float, default=1.0, help="max global grad norm; 0 disables clipping")
    # A high first scale that calibrates down within a few steps (as production fp16 runs start:
    # Megatron uses 2**32) and frequent growth, so a short run shows backoffs and growth.
    p.add_argument("--init-scale", type=float, default=2.0**20)
    p.add_argument("--growth-interval", type=int, default=20)
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="torch",
        help="scaling rule: torch's, the DeepSpeed / Megatron / fairseq preset (with this job's "
        "--init-scale and --growth-interval as their initial scale and window, their own defaults "
        "otherwise), or amax (grows only with headroom; see --amax-margin)",
    )
    p.add_argument(
        "--amax-margin", type=float, default=2.0**3, help="--policy amax: fp16 headroom kept (a factor > 1)"
    )
    p.add_argument(
        "--diagnose-overflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log which parameters held inf/NaN gradients on which rank, on overflow steps",
    )
    p.add_argument(
        "--underflow-every",
        type=int,
        default=10,
        help="measure the zero / fp16-underflow fraction of the gradients every N steps (0: never)",
    )
    p.add_argument("--tensorboard", type=Path, help="also write the metrics as TensorBoard scalars here")
    p.add_argument(
        "--hsdp-shard", type=int, default=0, help="HSDP shard group size (default: ranks per node)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", type=Path)
    p.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--resume", help='"auto" (latest checkpoint in --ckpt-dir, if any) or a checkpoint path')
    p.add_argument("--metrics", type=Path, help="JSON lines: one per step, then a summary (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument(
        "--inject-failure", metavar="STEP:RANK", help="testing aid: SIGKILL RANK at STEP (first attempt)"
    )
    rules = p.add_argument_group("skip rules and faults (distscale.rules; all off by default)")
    rules.add_argument(
        "--scaler",
        choices=["distscale", "torch"],
        default="distscale",
        help="torch: torch.amp.GradScaler, each rank on its own (for comparison; --policy torch only)",
    )
    rules.add_argument("--skip-norm-above", type=float, help="skip steps whose grad norm is above this")
    rules.add_argument("--skip-norm-sigma", type=float, help="skip grad-norm spikes of more than K sigma")
    rules.add_argument("--skip-loss-above", type=float, help="skip steps whose loss is above this")
    rules.add_argument("--skip-loss-sigma", type=float, help="skip loss spikes of more than K sigma")
    rules.add_argument(
        "--spike-window", type=int, default=100, help="applied steps the sigma rules compare with"
    )
    rules.add_argument(
        "--spike-warmup", type=int, default=100, help="applied steps before the sigma rules act"
    )
    rules.add_argument(
        "--on-fault", choices=["warn", "raise", "skip"], help="name suspected faults and warn, raise or skip"
    )
    rules.add_argument("--fault-repeats", type=int, default=3, help="lone non-finite steps that make a fault")
    rules.add_argument(
        "--inject-nan",
        metavar="RANK:STEP[:COUNT]",
        help="testing aid: a NaN in RANK's gradients after backward from STEP on (COUNT steps; default: to the end)",
    )
    rules.add_argument(
        "--corrupt-batch", metavar="RANK:STEP", help="testing aid: RANK's targets at STEP replaced by noise"
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.ckpt_every < 0 or args.underflow_every < 0:
        p.error("--steps and --batch must be >= 1, --ckpt-every and --underflow-every >= 0")
    if args.ckpt_every and args.ckpt_dir is None:
        p.error("--ckpt-every needs --ckpt-dir")
    if args.pp_size < 1 or args.microbatches < 1:
        p.error("--pp-size and --microbatches must be >= 1")
    if args.scaler == "torch" and (args.policy != "torch" or args.parallel in ("pp", "pp_fsdp")):
        p.error("--scaler torch runs torch's own rule (--policy torch) and no pipeline")
    args.inject_nan = _ints(p, "--inject-nan", args.inject_nan, 2, 3)
    args.corrupt_batch = _ints(p, "--corrupt-batch", args.corrupt_batch, 2, 2)
    return args


def _ints(
    p: argparse.ArgumentParser, flag: str, value: str | None, low: int, high: int
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(x) for x in value.split(":"))
    except ValueError:
        parts = ()
    if not low <= len(parts) <= high or min(parts) < 0:
        p.error(f"{flag} takes {low} to {high} non-negative integers separated by ':', got {value!r}")
    return parts


def build_model(args: argparse.Namespace, world: int, device: torch.device) -> tuple[nn.Module, int, int]:
    """Wrap the GPT for ``args.parallel``; return (model, data-parallel rank, data-parallel size)."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = GPT(GPTConfig()).to(device)
    rank = dist.get_rank()
    if args.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model), rank, world
    if args.parallel == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, device_id=device, auto_wrap_policy=ModuleWrapPolicy({Block})), rank, world
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if args.parallel == "hsdp":
        shard = args.hsdp_shard or int(os.environ.get("LOCAL_WORLD_SIZE", min(world, 2)))
        if world % shard:
            raise SystemExit(
                f"--parallel hsdp: world size {world} is not a multiple of the shard size {shard}"
            )
        mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, rank, world


def pipeline_mesh(args: argparse.Namespace, world: int, device: torch.device) -> Any:
    """The (pp, dp) mesh of a pipeline job: ``--pp-size`` stages, data parallel over the rest."""
    from torch.distributed.device_mesh import init_device_mesh

    if world % args.pp_size:
        raise SystemExit(
            f"--parallel {args.parallel}: world size {world} is not a multiple of --pp-size {args.pp_size}"
        )
    if args.pp_size > GPTConfig().layers or args.pp_size < 2:
        raise SystemExit(
            f"--pp-size must be in [2, {GPTConfig().layers}] (one block per stage), got {args.pp_size}"
        )
    return init_device_mesh(device.type, (args.pp_size, world // args.pp_size), mesh_dim_names=("pp", "dp"))


def build_pipeline(
    args: argparse.Namespace, mesh: Any, device: torch.device, scaler: GradScaler
) -> tuple[nn.Module, Any]:
    """This rank's stage of the GPT, wrapped for its data-parallel peers, and its schedule.

    The schedule runs backward itself: its loss goes through ``scaler.scale_loss_fn``, which keeps
    the losses it returns unscaled and makes every stage's gradients the scaled ones.
    """
    from torch.distributed import pipelining
    from torch.distributed.fsdp import fully_shard

    pp_rank, _ = mesh.get_coordinate()
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    stage = GPTStage(GPTConfig(), pp_rank, args.pp_size).to(device)
    dp = mesh["dp"]
    if args.parallel == "pp_fsdp":
        for block in stage.blocks.values():
            fully_shard(block, mesh=dp)
        fully_shard(stage, mesh=dp)
        module: nn.Module = stage
    elif dp.size() > 1:
        module = nn.parallel.DistributedDataParallel(stage, process_group=dp.get_group())
    else:
        module = stage
    pipe_stage = pipelining.PipelineStage(module, pp_rank, args.pp_size, device, group=mesh["pp"].get_group())
    schedule_cls = pipelining.ScheduleGPipe if args.pp_schedule == "gpipe" else pipelining.Schedule1F1B
    schedule = schedule_cls(pipe_stage, args.microbatches, loss_fn=scaler.scale_loss_fn(token_loss, device))
    return module, schedule


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_scaler(args: argparse.Namespace, device_type: str, **layout: Any) -> GradScaler:
    """The scaler for ``args.policy``; enabled for fp16 only (bf16 and fp32 need no scaling).
    ``layout``: the job's mesh and replicate dims, where tensors and wrappers do not tell them."""
    common: dict[str, Any] = {
        **layout,
        "enabled": args.dtype == "fp16",
        "overflow_diagnostics": args.diagnose_overflow,
        "underflow_every": args.underflow_every,
        "skip_grad_norm_above": args.skip_norm_above,
        "skip_grad_norm_sigma": args.skip_norm_sigma,
        "skip_loss_above": args.skip_loss_above,
        "skip_loss_sigma": args.skip_loss_sigma,
        "spike_window": args.spike_window,
        "spike_warmup": args.spike_warmup,
        "on_fault": args.on_fault,
        "fault_repeats": args.fault_repeats,
    }
    if args.policy in ("torch", "amax"):
        rule = {"rule": "amax", "amax_margin": args.amax_margin} if args.policy == "amax" else {}
        return GradScaler(
            device_type, init_scale=args.init_scale, growth_interval=args.growth_interval, **rule, **common
        )
    if args.policy == "deepspeed":
        power = math.log2(args.init_scale)
        if not power.is_integer():
            raise SystemExit(f"--policy deepspeed needs a power of two --init-scale, got {args.init_scale:g}")
        fp16 = {"enabled": True, "initial_scale_power": int(power), "loss_scale_window": args.growth_interval}
        return GradScaler.from_deepspeed_config({"fp16": fp16}, device_type, **common)
    if args.policy == "megatron":
        return GradScaler.from_megatron(
            device_type, initial_loss_scale=args.init_scale, loss_scale_window=args.growth_interval, **common
        )
    return GradScaler.from_fairseq(
        device_type, init_scale=args.init_scale, scale_window=args.growth_interval, **common
    )


class TorchScalerRun:
    """torch.amp.GradScaler with the calls this job makes (for ``--scaler torch``): each rank
    decides on its own gradients, as torch's scaler does; metrics are this rank's."""

    def __init__(self, args: argparse.Namespace, device_type: str) -> None:
        self.scaler = torch.amp.GradScaler(
            device_type, init_scale=args.init_scale, growth_interval=args.growth_interval,
            enabled=args.dtype == "fp16",
        )  # fmt: skip
        self.skipped = False
        self.num_skipped = 0
        self.opt: torch.optim.Optimizer | None = None

    def register_model(self, model: nn.Module) -> None:
        self.model = model

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def clip_grad_norm_(self, opt: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        self.scaler.unscale_(opt)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.scaler.step(opt)

    def update(self) -> None:
        assert self.opt is not None
        found = self.scaler._found_inf_per_device(self.opt)
        self.skipped = bool(sum(v.item() for v in found.values()))
        self.num_skipped += self.skipped
        self.scaler.update()

    def get_scale(self) -> float:
        return self.scaler.get_scale()

    def metrics(self) -> dict[str, Any]:
        return {
            "scale": self.get_scale(),
            "step_was_skipped": self.skipped,
            "skipped_steps": self.num_skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)


def plant_nan(model: nn.Module) -> None:
    """A NaN in this rank's first local gradient element (the --inject-nan fault)."""
    from torch.distributed.tensor import DTensor

    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if local.numel():
            local.view(-1)[0] = float("nan")
            return


def _address_of(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def stop_on_fault(exc: FaultError, args: argparse.Namespace, rank: int, step: int, parts: tuple) -> None:
    """A suspected fault with --on-fault raise: checkpoint the (consistent: the step was skipped
    on every rank) state, say what to do, and leave with exit code 3 on every rank."""
    model, opt, scaler = parts
    if args.ckpt_dir is not None:
        meta = {"parallel": args.parallel, "world_size": dist.get_world_size(), "dtype": args.dtype}
        ckpt.save(args.ckpt_dir, step + 1, checkpoint_state(model, opt, scaler, step + 1, args), meta)
    if rank == 0:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)  # no teardown: see __main__


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr * 10, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, fused=args.optimizer == "adamw_fused")


# Optimizer state flattened to one entry per parameter name (param-group settings included):
# pipeline stages hold different parameter groups, which must not collide under one key.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_state(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: GradScaler, step: int, args
) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=STATE_DICT_OPTIONS)
    # Data and every random choice are functions of (seed, step): the step *is* the data position
    # and the RNG state, on any number of ranks.
    train = {"step": step, "seed": args.seed, "batch": args.batch}
    return {"model": model_sd, "optim": optim_sd, "scaler": scaler, "train": train}


def restore(path: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler: GradScaler, args) -> int:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = checkpoint_state(model, opt, scaler, 0, args)
    ckpt.load(path, state)
    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=STATE_DICT_OPTIONS,
    )
    if state["train"]["seed"] != args.seed or state["train"]["batch"] != args.batch:
        raise SystemExit(
            f"{path} was written with seed/batch {state['train']}; pass the same --seed and --batch"
        )
    return int(state["train"]["step"])


def model_digest(model: nn.Module, stages: bool = False) -> str:
    """sha256 of the full (unsharded) parameters: equal digests mean bitwise equal models.
    ``stages``: ``model`` is one pipeline stage; the stages' parameters are gathered. Collective."""
    import contextlib

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    fsdp1 = isinstance(model, FSDP)
    gather = FSDP.summon_full_params(model, writeback=False) if fsdp1 else contextlib.nullcontext()
    named: dict[str, bytes] = {}
    with gather, torch.no_grad():
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            # clone: a numpy view would pin the storage FSDP1 frees when it reshards
            named[name.removeprefix("module.")] = full.detach().float().cpu().clone().numpy().tobytes()
    if stages:  # every stage's parameters (ranks of one stage hold the same full values)
        parts: list[dict[str, bytes]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, named)
        named = {k: v for part in parts for k, v in part.items()}
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name])
    return digest.hexdigest()


class Progress:
    """tqdm bar on rank 0 when tqdm is installed and wanted; log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, plain: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and not plain:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = f"loss {record['loss']:.4f} scale {record['scale']:g} skipped {record['skipped_total']}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif step % 10 == 0 or record["skipped"]:
            print(f"step {step:5d}  {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Overflow reports arrive on the "distscale" logger (rank 0 of the scaler's group).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    env = init_distributed()
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = env.rank, env.world_size
    pipelined = args.parallel in ("pp", "pp_fsdp")
    if pipelined:
        mesh = pipeline_mesh(args, world, device)
        # Stages hold different parameters: the scaler is told which dim holds copies (dp).
        scaler = make_scaler(args, device.type, mesh=mesh, replicate_dims=("dp",))
        model, schedule = build_pipeline(args, mesh, device, scaler)
        pp_rank, dp_rank = mesh.get_coordinate()
        dp_size = mesh["dp"].size()
        if args.batch % (dp_size * args.microbatches):
            raise SystemExit(
                f"--batch {args.batch} must split into {dp_size} data-parallel shards of --microbatches "
                f"{args.microbatches} equal microbatches: use a multiple of {dp_size * args.microbatches}"
            )
    else:
        model, dp_rank, dp_size = build_model(args, world, device)
        scaler = (
            TorchScalerRun(args, device.type) if args.scaler == "torch" else make_scaler(args, device.type)
        )
    opt = make_optimizer(args, model)
    scaler.register_model(model)
    language = MarkovLanguage(GPTConfig().vocab)

    start = 0
    path = ckpt.resolve(args.resume, args.ckpt_dir) if args.resume else None
    if path is not None:
        start = restore(path, model, opt, scaler, args)
        if rank == 0:
            print(f"resumed from {path} at step {start}", flush=True)

    fail_step, fail_rank = (
        (int(x) for x in args.inject_failure.split(":")) if args.inject_failure else (-1, -1)
    )
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    sinks: list[MetricsSink] = []
    if args.metrics:
        sinks.append(JsonlSink(args.metrics))  # appends: a resumed run continues the same file
    if args.tensorboard:
        sinks.append(TensorBoardSink(args.tensorboard))
    metrics = MetricsLogger(sinks)  # writes on rank 0 only (files are created on first write)
    progress = Progress(args.steps, start, rank == 0, args.no_progress)
    wall = time.perf_counter()
    record: dict[str, Any] = {}
    for step in range(start, args.steps):
        if step == fail_step and rank == fail_rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)  # the fault test: die without any cleanup
        tic = time.perf_counter()
        inputs, targets = language.local_batch(
            step, args.batch, GPTConfig().context, args.seed, dp_rank, dp_size
        )
        if args.corrupt_batch is not None and (rank, step) == tuple(args.corrupt_batch):
            noise = torch.Generator().manual_seed(step)  # a mislabelled batch: targets are noise
            targets = torch.randint(0, GPTConfig().vocab, targets.shape, generator=noise)
        inputs, targets = inputs.to(device), targets.to(device)
        opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
        if pipelined:
            losses: list[torch.Tensor] = []  # the last stage's microbatch losses, unscaled
            with autocast:
                schedule.step(
                    *((inputs,) if pp_rank == 0 else ()),
                    **({"target": targets, "losses": losses} if pp_rank == args.pp_size - 1 else {}),
                )
            loss = torch.stack(losses).mean() if losses else None
        else:
            with autocast:
                logits = model(inputs)
            loss = token_loss(logits, targets)
            scaler.scale(loss).backward()
        if args.inject_nan is not None and rank == args.inject_nan[0]:
            first, count = args.inject_nan[1], (args.inject_nan[2:] or (args.steps,))[0]
            if first <= step < first + count:
                plant_nan(model)  # a faulty device: after backward, in this rank's gradients only
        norm = scaler.clip_grad_norm_(opt, args.clip) if args.clip > 0 else None
        scaler.step(opt)
        try:
            scaler.update()
        except FaultError as exc:  # --on-fault raise: every rank, at this step
            stop_on_fault(exc, args, rank, step, (model, opt, scaler))
        # Logging (host reads and one all-reduce), outside the scaler's step. The scaler's
        # metrics are the same on every rank: one host read, no collective. The loss is the mean
        # over the ranks that computed one (every rank; the last stage's under a pipeline).
        global_loss = torch.stack(
            [
                torch.zeros((), device=device) if loss is None else loss.detach().float(),
                torch.ones((), device=device) * (loss is not None),
            ]
        )
        dist.all_reduce(global_loss)
        loss_sum, num_losses = global_loss.tolist()
        scaler_metrics = scaler.metrics()
        record = {
            "step": step,
            "loss": loss_sum / num_losses,
            "scale": scaler_metrics.get("scale", 1.0),
            "skipped": scaler_metrics.get("step_was_skipped", False),
            "skipped_total": scaler_metrics.get("skipped_steps", 0),
            "grad_norm": None if norm is None else norm.item(),
            "step_time": time.perf_counter() - tic,
            **{k: v for k, v in scaler_metrics.items() if k not in ("scale", "grad_norm")},
        }
        metrics.log(step, record)
        progress.update(step, record)
        done = step + 1
        if args.ckpt_dir is not None and (
            done == args.steps or (args.ckpt_every and done % args.ckpt_every == 0)
        ):
            meta = {"parallel": args.parallel, "world_size": world, "dtype": args.dtype}
            ckpt.save(args.ckpt_dir, done, checkpoint_state(model, opt, scaler, done, args), meta)
    progress.close()

    summary = {
        "summary": True,
        "launcher": env.launcher,
        "parallel": args.parallel,
        "world_size": world,
        "steps": args.steps,
        "resumed_from": start,
        "final_loss": record.get("loss"),
        "best_possible_loss": language.best_loss,
        "policy": args.policy,
        "scale": scaler.get_scale(),
        "skipped_steps": record.get("skipped_total", 0),
        "skipped_by_reason": {
            "overflow": record.get("skipped_total", 0),
            **{k: record.get(k, 0) for k in ("norm_spikes", "loss_spikes", "suspected_faults")},
        },
        "fault": None
        if getattr(scaler, "last_fault_report", None) is None
        else scaler.last_fault_report.format(),
        "wall_time_s": time.perf_counter() - wall,
        "model_sha256": model_digest(model, stages=pipelined),
    }
    by_rank: list[Any] = [None] * world
    # This rank's own view: under --scaler torch the ranks' scales, skips and replicas may differ.
    local_digest = None
    if args.parallel == "ddp":  # replicas: every rank holds all parameters
        params = b"".join(p.detach().float().cpu().numpy().tobytes() for p in model.parameters())
        local_digest = hashlib.sha256(params).hexdigest()
    skipped_here = sum(summary["skipped_by_reason"].values())  # every reason (torch: this rank's)
    # Where each rank ran: its host name and the address that name resolves to (on a multi-node
    # cluster, the node's; this gather itself crossed the nodes' network).
    where = (socket.gethostname(), _address_of(socket.gethostname()))
    dist.all_gather_object(by_rank, (summary["scale"], skipped_here, local_digest, where))
    summary["scale_by_rank"] = [b[0] for b in by_rank]
    summary["skipped_by_rank"] = [b[1] for b in by_rank]
    summary["host_by_rank"] = [b[3][0] for b in by_rank]
    summary["address_by_rank"] = [b[3][1] for b in by_rank]
    if args.parallel == "ddp":
        summary["replicas_equal"] = len({b[2] for b in by_rank}) == 1
    if rank == 0:
        print(
            f"done: {args.steps - start} steps on {world} rank(s) ({env.launcher}, {args.parallel}) in "
            f"{summary['wall_time_s']:.1f} s; final loss {summary['final_loss'] or float('nan'):.4f} "
            f"(floor {language.best_loss:.4f}); scale {summary['scale']:g} on every rank: "
            f"{len(set(summary['scale_by_rank'])) == 1}; skipped steps {summary['skipped_steps']}",
            flush=True,
        )
    metrics.close()
    if rank == 0 and args.metrics:
        with open(args.metrics, "a") as f:
            f.write(json.dumps(summary) + "\n")
    # torch 2.13 can deadlock when the last reference to a gloo group goes (the group's destructor
    # joins its worker threads while one of them waits for the GIL to free a finished collective's
    # tensors): keep what owns the groups alive until the process exits (see __main__).
    _KEEP_ALIVE.extend([model, opt])
    dist.destroy_process_group()
    return summary


_KEEP_ALIVE: list[Any] = []


if __name__ == "__main__":
    main()
    # Leave without interpreter teardown, where the objects in _KEEP_ALIVE would be destroyed
    # (deadlock or "terminate called without an active exception"); everything is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
