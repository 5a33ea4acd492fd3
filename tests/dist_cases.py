"""Training setups run inside spawned gloo ranks (imported by the children, so keep it importable).

Every setup trains the same small MLP with fp16 autocast on CPU, plants inf/NaN into *one* rank's
local gradient shard after backward (an inf in the input would spread to every shard and hide
bugs), and records per step: the scale, whether the optimizer applied the update, the backend
collectives issued by the scaler calls (``gloo:*`` profiler events) and the host reads
(``Tensor.item/__bool__/tolist/__float__/__int__``) made by the scaler calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import distscale
from distscale.testing import count_collectives, count_host_syncs

INF, NAN = float("inf"), float("nan")
# step -> (rank, value): planted after backward, into that rank's first non-empty local grad.
PLANTS_2 = {2: (1, INF), 4: (0, NAN), 5: (1, -INF)}
PLANTS_4 = {2: (3, INF), 4: (1, NAN), 5: (2, INF)}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 1)  # out dim 1: a zero-size shard on rank 1 under FSDP2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batch(dp_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + 100 * dp_index + step)
    x = torch.randn(8, 16, generator=gen)
    return x, x[:, :1] * 0.5 + 0.1


def build(setup: str, rank: int, world: int) -> tuple[nn.Module, int, int]:
    """Return (model, dp_index, dp_size) for ``setup``; every rank starts from the same weights."""
    torch.manual_seed(0)
    model = MLP()
    if setup in ("ddp", "ddp_bucket_view"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, gradient_as_bucket_view=setup == "ddp_bucket_view"), rank, world
    if setup.startswith("fsdp1"):
        from torch.distributed.fsdp import CPUOffload, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(
            model,
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            use_orig_params=setup == "fsdp1_orig",
            sharding_strategy=ShardingStrategy.NO_SHARD
            if setup == "fsdp1_no_shard"
            else ShardingStrategy.FULL_SHARD,
            cpu_offload=CPUOffload(offload_params=setup == "fsdp1_offload"),
        )
        return wrapped, rank, world
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if setup == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        dp_index, dp_size = rank, world
    elif setup == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        dp_index, dp_size = rank, world
    elif setup == "fsdp2_tp":
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(
            model,
            mesh2d["tp"],
            {
                "fc1": ColwiseParallel(),
                "fc2": RowwiseParallel(),
                "head": RowwiseParallel(input_layouts=Replicate()),
            },
        )
        mesh = mesh2d["dp"]
        dp_index, dp_size = mesh2d.get_coordinate()[0], 2
    else:
        raise ValueError(f"unknown setup {setup!r}")
    for layer in (model.fc1, model.fc2, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, dp_index, dp_size


def local_tensor(grad: torch.Tensor) -> torch.Tensor:
    return grad._local_tensor if hasattr(grad, "_local_tensor") else grad


def plant(model: nn.Module, value: float) -> None:
    for p in model.parameters():
        if p.grad is not None and local_tensor(p.grad).numel() > 0:
            local_tensor(p.grad).view(-1)[0] = value
            return
    raise AssertionError("no local gradient to plant into")


def forward_backward(
    model: nn.Module,
    scaler: Any,
    opt: torch.optim.Optimizer,
    rank: int,
    dp_index: int,
    step: int,
    plants: dict,
    set_to_none: bool = True,
) -> None:
    """One fp16 forward/backward on this rank's batch, then plant inf/NaN if this rank is due."""
    x, y = batch(dp_index, step)
    opt.zero_grad(set_to_none=set_to_none)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if step in plants and plants[step][0] == rank:
        plant(model, plants[step][1])


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    if kind == "adam_fused":
        return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    raise ValueError(kind)


def make_scaler(kind: str, **kwargs: Any) -> Any:
    args = {"init_scale": 2.0**10, "growth_interval": 3, **kwargs}
    if kind == "distscale":
        return distscale.GradScaler("cpu", **args)
    hysteresis = args.pop("hysteresis", 1)
    assert hysteresis == 1
    if kind == "torch":
        return torch.amp.GradScaler("cpu", **args)
    if kind == "sharded":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler("cpu", **args)
    raise ValueError(kind)


def local_snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [local_tensor(p.detach()).clone() for p in model.parameters()]


def train(
    setup: str,
    rank: int,
    world: int,
    *,
    scaler_kind: str = "distscale",
    optimizer: str = "sgd",
    explicit_unscale: bool = False,
    clip: bool = False,
    steps: int = 7,
    plants: dict[int, tuple[int, float]] | None = None,
    scaler_kwargs: dict[str, Any] | None = None,
    persistent_grads: bool = False,
) -> dict[str, Any]:
    """Train ``steps`` steps; return per-step records (or the error a scaler raised).

    ``persistent_grads``: ``zero_grad(set_to_none=False)``, so the grad tensors stay the same
    objects; "lean" records per step whether distscale reused the last step's layout for them."""
    plants = PLANTS_2 if plants is None else plants
    model, dp_index, _ = build(setup, rank, world)
    opt = make_optimizer(optimizer, model)
    scaler = make_scaler(scaler_kind, **(scaler_kwargs or {}))
    if scaler_kind == "distscale":
        scaler.register_model(model)  # DDP's and FSDP1's process groups, for the clip norm
    out: dict[str, Any] = {
        "scales": [],
        "stepped": [],
        "collectives": [],
        "host_reads": [],
        "lean": [],
        "error": None,
    }
    try:
        for step in range(steps):
            forward_backward(model, scaler, opt, rank, dp_index, step, plants, not persistent_grads)
            before = local_snapshot(model)
            with count_collectives() as colls, count_host_syncs() as reads:
                if clip:
                    if scaler_kind == "distscale":
                        scaler.clip_grad_norm_(opt, 1.0)
                    else:
                        scaler.unscale_(opt)
                        clip_peer(model, 1.0)
                elif explicit_unscale:
                    scaler.unscale_(opt)
                if scaler_kind == "distscale" and (clip or explicit_unscale):
                    out["lean"].append(scaler._engine.record(opt).grads.lean)
                scaler.step(opt)
                scaler.update()
            after = local_snapshot(model)
            out["stepped"].append(any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)))
            out["scales"].append(scaler.get_scale())
            out["collectives"].append(sum(colls.values()))
            out["host_reads"].append(sum(reads.values()))
    except Exception as exc:  # a peer scaler failing is a measured outcome, not a test crash
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


def clip_peer(model: nn.Module, max_norm: float) -> None:
    """The peers' clipping: FSDP1's own method, torch's (DTensor-aware) function otherwise."""
    if hasattr(model, "clip_grad_norm_"):
        model.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# ---------------------------------------------------------------------------- grouped jobs


MATRIX_2 = ["ddp", "ddp_bucket_view", "fsdp1", "fsdp1_orig", "fsdp1_no_shard", "fsdp1_offload", "fsdp2"]
MATRIX_4 = ["hsdp", "fsdp2_tp"]
VARIANTS = [
    {"optimizer": "sgd"},
    {"optimizer": "sgd", "clip": True},
    {"optimizer": "adamw_fused"},
    {"optimizer": "adamw_fused", "explicit_unscale": True},
    {"optimizer": "adamw_fused", "clip": True},
    {"optimizer": "sgd", "clip": True, "persistent_grads": True},
]


def job_matrix(rank: int, world: int, setups: list[str], scaler_kinds: list[str]) -> dict:
    plants = PLANTS_2 if world == 2 else PLANTS_4
    results = {}
    for setup in setups:
        for kind in scaler_kinds:
            for variant in VARIANTS:
                key = (setup, kind, tuple(sorted(variant.items())))
                results[key] = train(setup, rank, world, scaler_kind=kind, plants=plants, **variant)
    return results


def reference_grads(dp_size: int, step: int) -> list[torch.Tensor]:
    """Full, unsharded gradients of the mean loss over the data-parallel batches (fp32)."""
    torch.manual_seed(0)
    model = MLP()
    losses = [nn.functional.mse_loss(model(x), y) for x, y in (batch(d, step) for d in range(dp_size))]
    (sum(losses) / dp_size).backward()
    return [p.grad for p in model.parameters()]


def job_norms(rank: int, world: int, setups: list[str]) -> dict:
    """distscale's clip norm (fp32, no autocast) against the norm of the full gradients."""
    out = {}
    for setup in setups:
        for norm_type in (2.0, INF):
            for optimizer in ("sgd", "adamw_fused"):
                model, dp_index, dp_size = build(setup, rank, world)
                opt = make_optimizer(optimizer, model)
                scaler = make_scaler("distscale", init_scale=2.0**8)
                scaler.register_model(model)
                x, y = batch(dp_index, 0)
                scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
                got = scaler.clip_grad_norm_(opt, 1e9, norm_type=norm_type).item()
                full = reference_grads(dp_size, 0)
                want = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g, norm_type) for g in full]), norm_type
                ).item()
                out[(setup, norm_type, optimizer)] = (got, want)
    return out


def job_multi_optimizer(rank: int, world: int) -> dict:
    """Two optimizers sharing one scaler under FSDP2: one collective per step from step 2 on."""
    model, dp_index, _ = build("fsdp2", rank, world)
    opt_a = torch.optim.SGD(list(model.fc1.parameters()) + list(model.fc2.parameters()), lr=0.05)
    opt_b = torch.optim.AdamW(model.head.parameters(), lr=1e-2, fused=True)
    scaler = make_scaler("distscale")
    out: dict[str, Any] = {"scales": [], "collectives": [], "host_reads": []}
    for step in range(6):
        x, y = batch(dp_index, step)
        opt_a.zero_grad()
        opt_b.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == 3 and rank == 0:  # rank 1 holds zero-size shards of head
            plant(model.head, INF)
        with count_collectives() as colls, count_host_syncs() as reads:
            scaler.clip_grad_norm_(opt_a, 1.0)
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
        out["scales"].append(scaler.get_scale())
        out["collectives"].append(sum(colls.values()))
        out["host_reads"].append(sum(reads.values()))
    return out


def job_consistency_check(rank: int, world: int) -> str:
    """Ranks whose scale state diverged are named by an InconsistentStateError on every rank."""
    model, dp_index, _ = build("ddp", rank, world)
    opt = make_optimizer("sgd", model)
    scaler = make_scaler("distscale", check_consistency=1)
    for step in range(3):
        x, y = batch(dp_index, step)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if step == 2 and rank == 1:
            scaler._state.scale.mul_(2.0)  # simulate a rank whose state drifted
        try:
            scaler.step(opt)
        except distscale.InconsistentStateError as exc:
            return str(exc)
        scaler.update()
    return "no error"


# ---------------------------------------------------------------------------- checkpoint / resume

RESUME_PLANTS = {1: (1, INF), 3: (0, NAN), 4: (1, INF), 6: (0, INF), 7: (1, NAN)}
RESUME_SETUPS = {"ddp": "sgd", "fsdp2": "adamw_fused"}


def _resume_state(model: nn.Module, opt: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd, "scaler": scaler}


def job_resume(rank: int, world: int, mode: str, ckpt_root: str, k: int, total: int) -> dict:
    """mode "full": train ``total`` steps; "save": train ``k`` steps and save through DCP;
    "resume": load in fresh processes and train steps ``k..total``. Returns scales and local params."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    out = {}
    for setup, optimizer in RESUME_SETUPS.items():
        model, dp_index, _ = build(setup, rank, world)
        opt = make_optimizer(optimizer, model)
        scaler = make_scaler("distscale", hysteresis=2)
        start, stop = {"full": (0, total), "save": (0, k), "resume": (k, total)}[mode]
        if mode == "resume":
            state = _resume_state(model, opt, scaler)
            dcp.load(state, checkpoint_id=f"{ckpt_root}/{setup}")
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scales = []
        for step in range(start, stop):
            forward_backward(model, scaler, opt, rank, dp_index, step, RESUME_PLANTS)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.state_dict()["state"])
        if mode == "save":
            dcp.save(_resume_state(model, opt, scaler), checkpoint_id=f"{ckpt_root}/{setup}")
        out[setup] = {"states": scales, "params": local_snapshot(model)}
    return out


# ---------------------------------------------------------------------------- presets (distscale.presets)

PRESET_PLANTS = {1: (1, INF), 2: (0, NAN), 3: (1, INF), 6: (0, INF), 8: (1, -INF), 9: (1, INF), 10: (0, INF)}
PRESET_SCALERS: dict[str, tuple[str, dict[str, Any]]] = {
    # name -> (classmethod, arguments); "deepspeed" hits its minimum and raises, "fairseq_min" too.
    "deepspeed": (
        "from_deepspeed_config",
        {"config": {"fp16": {"initial_scale_power": 10, "loss_scale_window": 2, "min_loss_scale": 256}}},
    ),
    "deepspeed_consecutive": (
        "from_deepspeed_config",
        {
            "config": {
                "fp16": {"initial_scale_power": 10, "loss_scale_window": 2, "consecutive_hysteresis": True}
            }
        },
    ),
    "megatron": (
        "from_megatron",
        {"initial_loss_scale": 2.0**10, "loss_scale_window": 2, "min_loss_scale": 256.0},
    ),
    "fairseq": ("from_fairseq", {"init_scale": 2.0**10, "scale_window": 2, "tolerance": 0.3}),
    "fairseq_min": ("from_fairseq", {"init_scale": 2.0**10, "scale_window": 3, "min_loss_scale": 100.0}),
}


def make_preset_scaler(name: str) -> distscale.GradScaler:
    method, kwargs = PRESET_SCALERS[name]
    return getattr(distscale.GradScaler, method)(device="cpu", **kwargs)


def job_presets(rank: int, world: int, setups: list[str], steps: int = 12) -> dict:
    """Preset scalers on real ranks with one-rank overflows: per step the scale, whether the
    optimizer stepped, and the step at which a MinScaleError was raised (None if never)."""
    out = {}
    for setup in setups:
        for name in PRESET_SCALERS:
            model, dp_index, _ = build(setup, rank, world)
            opt = make_optimizer("sgd", model)
            scaler = make_preset_scaler(name)
            rec: dict[str, Any] = {"scales": [], "stepped": [], "raised_at": None, "error": None}
            for step in range(steps):
                forward_backward(model, scaler, opt, rank, dp_index, step, PRESET_PLANTS)
                before = local_snapshot(model)
                scaler.step(opt)
                try:
                    scaler.update()
                except distscale.MinScaleError as exc:
                    rec["raised_at"], rec["error"] = step, str(exc)
                after = local_snapshot(model)
                rec["stepped"].append(any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)))
                rec["scales"].append(scaler.get_scale())
                if rec["raised_at"] is not None:
                    break
            out[(setup, name)] = rec
    return out


# ---------------------------------------------------------------------------- reference scalers (peers)


def _deepspeed_env(rank: int, world: int) -> None:
    import os

    os.environ.update(
        LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )


def job_reference_scalers(
    rank: int,
    world: int,
    ds_cases: list[tuple[dict, list[bool]]],
    fp16_optimizer_cases: list[tuple[dict, list[bool]]],
    megatron_cases: list[tuple[dict, list[bool]]],
) -> dict[str, Any]:
    """Run the peers' own scaler classes on overflow sequences (in a child: DeepSpeed's comm must
    be initialised, and it and Megatron are heavy imports). Per case: the scale after every update
    until the peer raises, and the index of the update that raised (None if none). A package that
    does not import gives ``{"skip": reason}``."""
    import logging

    out: dict[str, Any] = {}
    try:
        _deepspeed_env(rank, world)
        import deepspeed
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend="gloo")
    except Exception as exc:
        out["deepspeed"] = out["fp16_optimizer"] = {
            "skip": f"deepspeed unusable: {type(exc).__name__}: {exc}"
        }
    else:
        results = []
        for args, flags in ds_cases:
            ds = DynamicLossScaler(**args)
            scales, raised_at = [], None
            for i, flag in enumerate(flags):
                try:
                    ds.update_scale(flag)
                except Exception:  # DeepSpeed raises a bare Exception at its minimum scale
                    raised_at = i
                    break
                scales.append(float(ds.cur_scale))
            results.append((scales, raised_at))
        out["deepspeed"] = results
        results = []
        for args, flags in fp16_optimizer_cases:
            # FP16_Optimizer._update_scale reads only these two attributes of the optimizer.
            holder = type("Holder", (), {})()
            holder.verbose = False
            holder.loss_scale_config = LossScaleConfig(torch.float16, True, 1.0, args)
            scales = []
            for flag in flags:
                FP16_Optimizer._update_scale(holder, flag)
                scales.append(float(holder.loss_scale_config.cur_scale))
            results.append((scales, None))
        out["fp16_optimizer"] = results
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core.optimizer.grad_scaler as grad_scaler
    except Exception as exc:
        out["megatron"] = {"skip": f"megatron-core unusable: {type(exc).__name__}: {exc}"}
    else:
        # DynamicGradScaler creates its tensors with device='cuda'; on a CPU-only machine its own
        # code runs unchanged against a torch whose tensor() ignores the device.
        class _CPUTorch:
            def __getattr__(self, name: str) -> Any:
                return getattr(torch, name)

            @staticmethod
            def tensor(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
                return torch.tensor(*args, **kwargs)

        grad_scaler.torch = _CPUTorch()  # this child process only
        results = []
        for args, flags in megatron_cases:
            mc = grad_scaler.DynamicGradScaler(**args)
            scales = []
            for flag in flags:
                mc.update(flag)
                scales.append(float(mc.scale.item()))
            results.append((scales, None))
        out["megatron"] = results
    return out


def job_deepspeed_engine(rank: int, world: int, stages: list[int], fp16: dict, steps: int = 10) -> dict:
    """ZeRO-1/2 engines on real ranks, inf planted into one rank's gradient of one parameter:
    DeepSpeed's own dynamic scaler ("native") against distscale's rule driving a static-configured
    engine through DeepSpeedLossScale ("adapter"). Per step: applied, the scale for the next step,
    the (fp16) parameters after it."""
    import logging

    _deepspeed_env(rank, world)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    from distscale.deepspeed_engine import DeepSpeedLossScale

    logger.setLevel(logging.ERROR)
    get_accelerator().is_fp16_supported = lambda: True  # this CPU lacks AVX512-FP16; tests only
    deepspeed.init_distributed(dist_backend="gloo")
    # step -> (rank, parameter index): the grad of that parameter on that rank becomes inf
    # before DeepSpeed reduces it, so only the rank owning its partition sees it locally.
    plants = {1: (1, 0), 2: (0, 5), 3: (1, 5), 6: (0, 0), 7: (1, 5)}
    out = {}
    for stage in stages:
        for mode in ("native", "adapter"):
            torch.manual_seed(0)
            model = MLP()
            section = {"enabled": True, **fp16} if mode == "native" else {"enabled": True, "loss_scale": 1.0}
            config = {
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": 1,
                "fp16": section,
                "zero_optimization": {"stage": stage},
                "steps_per_print": 10**9,
            }
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            driver = None
            if mode == "adapter":
                driver = DeepSpeedLossScale(engine, distscale.GradScaler.from_deepspeed_config(fp16, "cpu"))
            params = list(engine.module.parameters())
            rec: dict[str, Any] = {"applied": [], "scales": [], "params": []}
            for step in range(steps):
                handle = None
                if step in plants and plants[step][0] == rank:
                    handle = params[plants[step][1]].register_hook(lambda g: torch.full_like(g, INF))
                x, y = batch(rank, step)
                loss = nn.functional.mse_loss(engine(x.half()).float(), y)
                engine.backward(loss)
                engine.step()
                if handle is not None:
                    handle.remove()
                if driver is not None:
                    assert driver.update() == engine.was_step_applied()
                rec["applied"].append(engine.was_step_applied())
                rec["scales"].append(float(engine.optimizer.loss_scale))
                rec["params"].append([p.detach().float().clone() for p in engine.module.parameters()])
            out[(stage, mode)] = rec
    return out


# ---------------------------------------------------------------------------- observability


def _full_grads(model: nn.Module) -> list[torch.Tensor]:
    # The job-wide gradient (collectives): FSDP1 gathers its unpadded grads, a DTensor its full
    # tensor; a DDP replica is the one rank 0 holds.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, with_grads=True):
            return [p.grad.clone() for p in model.parameters()]
    return [
        p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for p in model.parameters()
    ]


def job_observability(rank: int, world: int, setups: list[str], steps: int = 7) -> dict:
    """Metrics, overflow diagnostics and the underflow monitor under ``PLANTS_2``.

    On every step rank 0 also zeroes 4 elements and makes 4 tiny (would flush in fp16) in its first
    local grad; monitor steps (every 2 updates) record the job-wide reference fractions computed
    from the full gradients, which the scaler must reproduce from local shards.
    """
    out = {}
    for setup in setups:
        model, dp_index, _ = build(setup, rank, world)
        opt = make_optimizer("sgd", model)
        scaler = distscale.GradScaler(
            "cpu", init_scale=2.0**10, growth_interval=3, overflow_diagnostics=True, underflow_every=2
        )
        scaler.register_model(model)
        rec: dict[str, list] = {"metrics": [], "reports": [], "collectives": [], "reference": [], "norms": []}
        for step in range(steps):
            forward_backward(model, scaler, opt, rank, dp_index, step, {})
            if rank == 0:
                first = next(
                    local_tensor(p.grad) for p in model.parameters() if local_tensor(p.grad).numel() >= 8
                )
                first.view(-1)[:4] = 0.0
                first.view(-1)[4:8] = 1e-9
            if step in PLANTS_2 and PLANTS_2[step][0] == rank:
                plant(model, PLANTS_2[step][1])
            reference = None
            if step % 2 == 0:
                full = torch.cat([g.reshape(-1).double() for g in _full_grads(model)])
                zeros = (full == 0).sum().item()
                flush = ((full.abs() <= 2.0**-25) & (full != 0)).sum().item()
                reference = (zeros / full.numel(), flush / full.numel())
            with count_collectives() as colls:
                norm = scaler.clip_grad_norm_(opt, 1.0)
                scaler.step(opt)
                scaler.update()
            report = scaler.last_overflow_report
            rec["reports"].append(
                None if report is None else (report.step, [(g.rank, g.name, g.kind) for g in report.grads])
            )
            rec["metrics"].append(scaler.metrics())
            rec["collectives"].append(sum(colls.values()))
            rec["reference"].append(reference)
            rec["norms"].append(norm.item())
        out[setup] = rec
    return out


def job_amax(rank: int, world: int, setup: str) -> dict[str, Any]:
    """The "amax" rule on real ranks: each rank's largest local |scaled grad| and the job-wide
    metrics per step; rank 1 holds a 64x larger gradient element at step 2."""
    model, dp_index, _ = build(setup, rank, world)
    opt = make_optimizer("adamw_fused", model)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**10, growth_interval=2, rule="amax", amax_margin=16.0)
    scaler.register_model(model)
    out: dict[str, Any] = {"local": [], "metrics": [], "collectives": [], "host_reads": []}
    for step in range(6):
        forward_backward(model, scaler, opt, rank, dp_index, step, {})
        grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
        if step == 2 and rank == 1:
            first = next(g for g in grads if g.numel())
            first.view(-1)[0] = 64 * max(float(g.abs().max()) for g in grads if g.numel())
        out["local"].append(max((float(g.abs().max()) for g in grads if g.numel()), default=0.0))
        with count_collectives() as colls, count_host_syncs() as reads:
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
        out["metrics"].append(scaler.metrics())
        out["collectives"].append(sum(colls.values()))
        out["host_reads"].append(sum(reads.values()))
    return out


class LegacyProtocolSGD(torch.optim.SGD):
    """An optimizer of torch's legacy ``grad_scaler=`` protocol: it asks the scaler for the step's
    inf/NaN decision, skips on it, and unscales its gradients itself."""

    _step_supports_amp_scaling = True

    def step(self, closure: Any = None, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        if grad_scaler is not None:
            found = grad_scaler._check_inf_per_device(self)
            assert grad_scaler._found_inf_per_device(self) == found
            if sum(float(v) for v in found.values()):
                return "skipped"
            inv = grad_scaler._get_scale_async().double().reciprocal().float()
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv)
        super().step(closure)
        return "stepped"


def job_legacy_protocol(rank: int, world: int, setups: list[str]) -> dict:
    """The legacy protocol on real ranks: an inf on one rank's grads, every rank's optimizer skips."""
    out: dict[str, Any] = {}
    for setup in setups:
        model, dp_index, _ = build(setup, rank, world)
        opt = LegacyProtocolSGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = make_scaler("distscale")
        returned, scales, collectives = [], [], []
        for step in range(5):
            forward_backward(model, scaler, opt, rank, dp_index, step, {2: (1, INF)})
            with count_collectives() as colls:
                returned.append(scaler.step(opt))
                scaler.update()
            scales.append(scaler.get_scale())
            collectives.append(sum(colls.values()))
        out[setup] = {
            "returned": returned,
            "scales": scales,
            "collectives": collectives,
            "params": [p.tolist() for p in local_snapshot(model)],
        }
    return out
