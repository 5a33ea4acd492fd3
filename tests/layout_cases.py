"""Layouts where ranks hold *different* parameters, run inside spawned gloo ranks.

Pipeline stages (``torch.distributed.pipelining``), pipeline stages x FSDP2, Megatron-style tensor
parallelism with plain tensors x DDP, and experts on an expert axis (plain tensors, DTensors on the
whole mesh, DTensors on the expert sub-mesh). Each layout is trained for a few fp16 steps with an
inf/NaN planted into one stage's or one expert's local gradient after backward, and its clip norm
is compared (fp32) with the norm of the full, unsharded model's gradients computed on one process.
Checkpoints go through ``torch.distributed.checkpoint``; model-parallel pieces are keyed by their
model-parallel coordinate (a plain tensor has the same name on every rank, and DCP would keep one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

import distscale
from distscale.testing import count_collectives, count_host_syncs

INF, NAN = float("inf"), float("nan")
D = 16  # width of every layer
BATCH = 8  # per data-parallel rank
MICROBATCHES = 4
STEPS = 6
RESUME_AT = 3  # a checkpoint after this many steps; the resumed run must match the full one
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "zbv")


def batch(dp_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5000 + 100 * dp_index + step)
    x = torch.randn(BATCH, D, generator=gen)
    return x, torch.tanh(x.flip(1)) * 0.5


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.float(), target)


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, fused=True)


def local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def full_norm(grads: list[torch.Tensor], norm_type: float) -> float:
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads]), norm_type
    ).item()


# ---------------------------------------------------------------------------- pipeline stages


def stack(num_layers: int = 4) -> list[nn.Module]:
    """The full model as a list of layers; every rank builds all of them from one seed."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(num_layers)]


class Pipeline:
    """This rank's stages of a 4-layer stack, with a ``torch.distributed.pipelining`` schedule.

    ``stage_modules`` holds this rank's stages under their stage index (unique names for DCP).
    """

    def __init__(
        self,
        schedule: str,
        pp_rank: int,
        pp_size: int,
        pp_group: dist.ProcessGroup,
        loss: Callable[..., torch.Tensor] | None,
        shard: Callable[[nn.Module], None] | None = None,
    ) -> None:
        from torch.distributed import pipelining as pl

        layers = stack()
        per_rank = 1 if schedule in ("gpipe", "1f1b") else 2
        num_stages = pp_size * per_rank
        per_stage = len(layers) // num_stages
        if schedule == "zbv":  # V-shaped: rank r holds stages r and 2 * pp_size - 1 - r
            indices = [pp_rank, num_stages - 1 - pp_rank]
        else:
            indices = [pp_rank + pp_size * k for k in range(per_rank)]
        self.stage_modules = nn.ModuleDict()
        stages = []
        for i in indices:
            module = nn.Sequential(*layers[i * per_stage : (i + 1) * per_stage])
            if shard is not None:
                shard(module)
            self.stage_modules[f"stage{i}"] = module
            stages.append(pl.PipelineStage(module, i, num_stages, torch.device("cpu"), group=pp_group))
        self.first = any(s.is_first for s in stages)
        self.last = any(s.is_last for s in stages)
        if schedule in ("interleaved1f1b", "zbv"):
            cls = pl.ScheduleInterleaved1F1B if schedule == "interleaved1f1b" else pl.ScheduleZBVZeroBubble
            self.schedule = cls(stages, MICROBATCHES, loss_fn=loss)
        else:
            cls = pl.ScheduleGPipe if schedule == "gpipe" else pl.Schedule1F1B
            self.schedule = cls(stages[0], MICROBATCHES, loss_fn=loss)

    def step(self, x: torch.Tensor, y: torch.Tensor, autocast: bool = True) -> list[torch.Tensor]:
        """One schedule step; returns the microbatch losses (on the last stage, else [])."""
        losses: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {"target": y, "losses": losses} if self.last else {}
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            self.schedule.step(*((x,) if self.first else ()), **kwargs)
        return losses


def reference_grads(dp_size: int, step: int) -> list[torch.Tensor]:
    """Gradients of the full stack for the mean loss over every data-parallel batch (fp32)."""
    model = nn.Sequential(*stack())
    losses = [loss_fn(model(x), y) for x, y in (batch(d, step) for d in range(dp_size))]
    (sum(losses) / dp_size).backward()
    return [p.grad for p in model.parameters()]


def job_two_ranks(rank: int, world: int) -> dict[str, Any]:
    """2 ranks holding different plain parameters, DDP, FSDP1: declared, derived or refused."""
    mesh = _mesh((world,), ("pp",))
    out: dict[str, Any] = {}

    # The bug as a new user meets it: each rank its own parameter (two stages), grads 3 and 6.
    param = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([param], lr=0.1)
    for declared in (False, True):
        kwargs = {"mesh": mesh, "replicate_dims": ()} if declared else {}
        scaler = distscale.GradScaler("cpu", init_scale=4.0, **kwargs)
        scaler.scale(param.sum() * (3.0 if rank == 0 else 6.0)).backward()
        try:
            out[("two_params", declared)] = scaler.clip_grad_norm_(opt, 1e9).item()
        except distscale.ReplicationError as exc:
            out[("two_params", declared)] = str(exc)
        opt.zero_grad()
    # found_inf needs no declaration: an inf on rank 1 skips the step on both ranks.
    scaler = distscale.GradScaler("cpu", init_scale=4.0)
    scaler.scale(param.sum()).backward()
    if rank == 1:
        param.grad[0] = INF
    scaler.step(opt)
    scaler.update()
    out["undeclared_skip"] = (scaler.last_step_skipped(), scaler.get_scale(), param.detach().clone())

    # DDP over the whole group: derived once the wrapper is registered, refused before.
    from torch.nn.parallel import DistributedDataParallel as DDP

    for registered in (False, True):
        torch.manual_seed(0)
        model = DDP(nn.Linear(D, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = distscale.GradScaler("cpu", init_scale=4.0)
        if registered:
            scaler.register_model(model)
        x, y = batch(rank, 0)
        scaler.scale(loss_fn(model(x), y[:, :1])).backward()
        try:
            out[("ddp", registered)] = scaler.clip_grad_norm_(opt, 1e9).item()
        except distscale.ReplicationError as exc:
            out[("ddp", registered)] = str(exc)

    # FSDP1 with original parameters, and NO_SHARD: their tensors do not name FSDP1's group.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    for name, kwargs in (
        ("fsdp1_orig", {"use_orig_params": True}),
        ("fsdp1_no_shard", {"sharding_strategy": ShardingStrategy.NO_SHARD}),
    ):
        for registered in (False, True):
            torch.manual_seed(0)
            model = FSDP(nn.Linear(D, 3), device_id=torch.device("cpu"), **kwargs)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = distscale.GradScaler("cpu", init_scale=4.0)
            if registered:
                scaler.register_model(model)
            x, y = batch(rank, 0)
            scaler.scale(loss_fn(model(x), y[:, :3])).backward()
            try:
                out[(name, registered)] = scaler.clip_grad_norm_(opt, 1e9).item()
            except distscale.ReplicationError as exc:
                out[(name, registered)] = str(exc)

    return out


def job_pipeline(rank: int, world: int) -> dict[str, Any]:
    """2 ranks, 2 pipeline stages (4 with the interleaved and V schedules): per-check results."""
    group = dist.group.WORLD
    mesh = _mesh((world,), ("pp",))
    out: dict[str, Any] = {}
    for schedule in SCHEDULES:
        out[("exact", schedule)] = _pipeline_exactness(schedule, rank, world, group, mesh)
        for optimizer in ("sgd", "adamw_fused"):
            out[("train", schedule, optimizer)] = _pipeline_train(
                schedule, optimizer, rank, world, group, mesh
            )
    return out


def _pipeline_exactness(schedule: str, rank: int, world: int, group: Any, mesh: Any) -> dict[str, Any]:
    """Logged losses are unscaled; accumulated grads are exactly the scale times the unscaled ones;
    the clip norm (fp32) equals the full model's."""
    runs = {}
    for scaled in (False, True):
        scaler = distscale.GradScaler("cpu", init_scale=2.0**12, mesh=mesh, replicate_dims=())
        pipe = Pipeline(schedule, rank, world, group, scaler.scale_loss_fn(loss_fn) if scaled else loss_fn)
        x, y = batch(0, 0)
        losses = pipe.step(x, y, autocast=False)
        grads = [p.grad.clone() for p in pipe.stage_modules.parameters()]
        opt = make_optimizer("sgd", pipe.stage_modules.parameters())
        norm = scaler.clip_grad_norm_(opt, 1e9).item() if scaled else None
        runs[scaled] = ([loss.detach().clone() for loss in losses], grads, norm)
    (plain_losses, plain_grads, _), (losses, grads, norm) = runs[False], runs[True]
    return {
        "losses_equal": len(losses) == len(plain_losses)
        and all(torch.equal(a, b) for a, b in zip(losses, plain_losses, strict=True)),
        "num_losses": len(losses),
        "grads_exact": all(torch.equal(g, p * 2.0**12) for g, p in zip(grads, plain_grads, strict=True)),
        "norm": (norm, full_norm(reference_grads(1, 0), 2.0)),
    }


def _pipeline_train(
    schedule: str, optimizer: str, rank: int, world: int, group: Any, mesh: Any
) -> dict[str, Any]:
    plants = {1: (1, INF), 3: (0, NAN)}  # step -> (rank, value), into that stage's local grad

    def build(scaler: distscale.GradScaler) -> tuple[Pipeline, torch.optim.Optimizer]:
        pipe = Pipeline(schedule, rank, world, group, scaler.scale_loss_fn(loss_fn))
        return pipe, make_optimizer(optimizer, pipe.stage_modules.parameters())

    def forward_backward(pipe: Pipeline, n: int) -> None:
        pipe.step(*batch(0, n))
        _plant(list(pipe.stage_modules.parameters()), plants, n, rank)

    return _train_and_resume(
        f"pp-{schedule}-{optimizer}",
        build,
        forward_backward,
        lambda pipe: pipe.stage_modules,
        mesh,
        (),
        key=f"pp{rank}",
    )


# ---------------------------------------------------------------------------- shared machinery


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _plant(params: list[torch.Tensor], plants: dict[int, tuple[int, float]], step: int, rank: int) -> None:
    if step in plants and plants[step][0] == rank:
        first = next(local(p.grad) for p in params if p.grad is not None and local(p.grad).numel())
        first.view(-1)[0] = plants[step][1]


def _train_and_resume(
    name: str,
    build: Callable[[distscale.GradScaler], tuple[Any, torch.optim.Optimizer]],
    forward_backward: Callable[[Any, int], None],
    module_of: Callable[[Any], nn.Module],
    mesh: Any,
    replicate_dims: tuple[str, ...],
    key: str,
) -> dict[str, Any]:
    """Train STEPS steps (``forward_backward`` then the scaler's clip, step, update), recording per
    step the scale state, whether the local params changed, and the collectives and host reads of
    the scaler's calls alone; checkpoint at RESUME_AT through DCP;
    then resume from it in a fresh model, optimizer and scaler and train to STEPS. ``key``: this
    rank's model-parallel coordinate, naming its pieces in the checkpoint."""
    import tempfile

    import torch.distributed.checkpoint as dcp

    def fresh() -> tuple[Any, torch.optim.Optimizer, distscale.GradScaler]:
        scaler = distscale.GradScaler(
            "cpu", init_scale=2.0**10, growth_interval=2, mesh=mesh, replicate_dims=replicate_dims
        )
        model, opt = build(scaler)
        scaler.register_model(module_of(model))
        return model, opt, scaler

    def snapshot(model: Any) -> list[torch.Tensor]:
        return [local(p.detach()).clone() for p in module_of(model).parameters()]

    def scaler_step(opt: torch.optim.Optimizer, scaler: distscale.GradScaler) -> None:
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()

    rec: dict[str, Any] = {"states": [], "stepped": [], "collectives": [], "host_reads": []}
    model, opt, scaler = fresh()
    workdir = _shared_tempdir(tempfile)
    for n in range(STEPS):
        opt.zero_grad()
        forward_backward(model, n)
        before = snapshot(model)
        with count_collectives() as colls, count_host_syncs() as reads:
            scaler_step(opt, scaler)
        rec["stepped"].append(
            any(not torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
        )
        rec["states"].append(scaler.state_dict()["state"])
        rec["collectives"].append(sum(colls.values()))
        rec["host_reads"].append(sum(reads.values()))
        if n + 1 == RESUME_AT:
            dcp.save(_ckpt_state(module_of(model), opt, scaler, key), checkpoint_id=f"{workdir}/{name}")
    rec["final"] = snapshot(model)

    model, opt, scaler = fresh()
    state = _ckpt_state(module_of(model), opt, scaler, key)
    dcp.load(state, checkpoint_id=f"{workdir}/{name}")
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        module_of(model), opt, model_state_dict=state["model"][key], optim_state_dict=state["optim"][key]
    )
    resumed = []
    for n in range(RESUME_AT, STEPS):
        opt.zero_grad()
        forward_backward(model, n)
        scaler_step(opt, scaler)
        resumed.append(scaler.state_dict()["state"])
    rec["resumed_states"] = resumed
    rec["resumed_final"] = snapshot(model)
    return rec


def _shared_tempdir(tempfile: Any) -> str:
    # One directory for all ranks (rank 0 makes it; the others learn its name).
    path = [tempfile.mkdtemp(prefix="distscale-layout-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return str(path[0])


def _ckpt_state(module: nn.Module, opt: torch.optim.Optimizer, scaler: Any, key: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, opt)
    return {"model": {key: model_sd}, "optim": {key: optim_sd}, "scaler": scaler}


# ---------------------------------------------------------------------------- 4 ranks


def job_four_ranks(rank: int, world: int) -> dict[str, Any]:
    """PP(2) x FSDP2(2), plain TP(2) x DDP(2), experts on an expert axis (plain tensors, DTensors on
    the whole mesh, DTensors on the expert sub-mesh): training, norms, refusals, bad declarations."""
    out: dict[str, Any] = {"bad_input": _bad_declarations()}
    for layout, (build_case, optimizers) in LAYOUTS.items():
        case = build_case(rank)
        out[(layout, "norm")] = case.norm_check()
        out[(layout, "undeclared")] = case.undeclared()
        for optimizer in optimizers:
            out[(layout, optimizer)] = case.train(optimizer)
    return out


def _bad_declarations() -> dict[str, str]:
    """Declarations that cannot be right fail at construction, naming the argument and the fix."""
    mesh = _mesh((2, 2), ("dp", "tp"))
    unnamed = _mesh((2, 2), None)  # type: ignore[arg-type]
    attempts: dict[str, Callable[[], Any]] = {
        "sub_mesh": lambda: distscale.GradScaler("cpu", mesh=mesh["dp"], replicate_dims=("dp",)),
        "unknown_dim": lambda: distscale.GradScaler("cpu", mesh=mesh, replicate_dims=("data",)),
        "no_dims": lambda: distscale.GradScaler("cpu", mesh=mesh),
        "string_dims": lambda: distscale.GradScaler("cpu", mesh=mesh, replicate_dims="dp"),
        "unnamed": lambda: distscale.GradScaler("cpu", mesh=unnamed, replicate_dims=()),
        "dims_without_mesh": lambda: distscale.GradScaler("cpu", replicate_dims=("dp",)),
        "not_a_mesh": lambda: distscale.GradScaler("cpu", mesh=[[0, 1], [2, 3]], replicate_dims=()),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "accepted"
        except (TypeError, ValueError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    # A param group naming a dim the mesh lacks: refused at the first norm, on every rank.
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [param], "replicate_dims": ("dq",)}], lr=0.1)
    scaler = distscale.GradScaler("cpu", mesh=mesh, replicate_dims=("dp",))
    scaler.scale(param.sum()).backward()
    try:
        scaler.clip_grad_norm_(opt, 1.0)
        out["bad_group_key"] = "accepted"
    except distscale.ReplicationError as exc:
        out["bad_group_key"] = str(exc)
    return out


class _Case:
    """One layout on this rank: ``model`` (what the scaler registers), its optimizer param groups,
    its forward/backward, the reference gradients of the full model, and its declaration."""

    mesh: Any
    replicate_dims: tuple[str, ...]
    key: str  # this rank's model-parallel coordinate: names its pieces in checkpoints
    plants: ClassVar[dict[int, tuple[int, float]]] = {
        1: (3, INF),
        3: (0, NAN),
        4: (2, -INF),
    }  # step -> (rank, value)

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def build(self) -> tuple[nn.Module, list[dict[str, Any]]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, step: int, scaler: Any) -> None:
        raise NotImplementedError

    def reference(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def declared(self) -> dict[str, Any]:
        return {"mesh": self.mesh, "replicate_dims": self.replicate_dims}

    def undeclared_kwargs(self) -> dict[str, Any]:
        return {}

    def norm_check(self) -> dict[str, Any]:
        """fp32, step 0: the clip norm (2 and inf) against the full model's, for both optimizers."""
        out = {}
        for norm_type in (2.0, INF):
            for optimizer in ("sgd", "adamw_fused"):
                model, groups = self.build()
                opt = make_optimizer_groups(optimizer, groups)
                scaler = distscale.GradScaler("cpu", init_scale=2.0**8, **self.declared())
                scaler.register_model(model)
                self.loss(model, 0, scaler, autocast=False)
                got = scaler.clip_grad_norm_(opt, 1e9, norm_type=norm_type).item()
                out[(norm_type, optimizer)] = (got, full_norm(self.reference(), norm_type))
        return out

    def undeclared(self) -> str:
        """Without the declaration the first clip raises ReplicationError on every rank."""
        model, groups = self.build()
        for group in groups:
            group.pop("replicate_dims", None)
        opt = make_optimizer_groups("sgd", groups)
        scaler = distscale.GradScaler("cpu", init_scale=2.0**8, **self.undeclared_kwargs())
        scaler.register_model(model)
        self.loss(model, 0, scaler, autocast=True)
        try:
            scaler.clip_grad_norm_(opt, 1.0)
        except distscale.ReplicationError as exc:
            return str(exc)
        return "no error"

    def train(self, optimizer: str) -> dict[str, Any]:
        def build(scaler: distscale.GradScaler) -> tuple[Any, torch.optim.Optimizer]:
            model, groups = self.build()
            self._scaler = scaler
            return model, make_optimizer_groups(optimizer, groups)

        def forward_backward(model: nn.Module, n: int) -> None:
            self.loss(model, n, self._scaler, autocast=True)
            _plant(list(model.parameters()), self.plants, n, self.rank)

        return _train_and_resume(
            f"{type(self).__name__}-{optimizer}",
            build,
            forward_backward,
            lambda model: model,
            self.mesh,
            self.replicate_dims,
            key=self.key,
        )


def make_optimizer_groups(kind: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-2, fused=True)


class PipelineFSDP2(_Case):
    """Two pipeline stages, each sharded by FSDP2 over its own data-parallel pair of ranks.
    The stages' DTensors live on sub-meshes (mesh["dp"]): ``replicate_dims=()`` says the other
    dim (pp) holds other stages."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.mesh = _mesh((2, 2), ("pp", "dp"))
        self.replicate_dims = ()
        self.pp_rank, self.dp_rank = self.mesh.get_coordinate()
        self.key = f"pp{self.pp_rank}"
        self._pipe: Pipeline | None = None

    def build(self) -> tuple[nn.Module, list[dict[str, Any]]]:
        from torch.distributed.fsdp import fully_shard

        self._scale_fn = _ScaleFnSlot()
        pipe = Pipeline(
            "1f1b",
            self.pp_rank,
            2,
            self.mesh["pp"].get_group(),
            self._scale_fn,
            shard=lambda m: fully_shard(m, mesh=self.mesh["dp"]),
        )
        self._pipe = pipe
        pipe.stage_modules.pipeline = pipe  # type: ignore[assignment]  # found again by ``loss``
        return pipe.stage_modules, [{"params": list(pipe.stage_modules.parameters())}]

    def loss(self, model: nn.Module, step: int, scaler: Any, autocast: bool = True) -> None:
        self._scale_fn.fn = scaler.scale_loss_fn(loss_fn)
        model.pipeline.step(*batch(self.dp_rank, step), autocast=autocast)  # type: ignore[operator]

    def reference(self) -> list[torch.Tensor]:
        return reference_grads(2, 0)


class _ScaleFnSlot:
    """A loss function whose scaled wrapper is set after the schedule is built (the schedule
    takes its loss_fn at construction; the scaler of a run is made later)."""

    fn: Callable[..., torch.Tensor] = staticmethod(loss_fn)

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.fn(*args)


class _CopyToGroup(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward (partial sums to the full output), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    summed = x.float().contiguous()
    dist.all_reduce(summed, group=group)
    return summed.to(x.dtype)


class _Dense(nn.Module):
    """The full model of the tensor-parallel case: LayerNorm, Linear(D, 2D), ReLU, Linear(2D, D)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.ln = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.ln(x))))


class _TensorParallelDense(nn.Module):
    """One tensor-parallel rank's piece of ``_Dense``, as plain tensors (Megatron style): fc1 split
    by output rows (column parallel), fc2 by input columns (row parallel); the LayerNorm and fc2's
    bias are duplicated on every tensor-parallel rank."""

    def __init__(self, tp_rank: int, tp_size: int, tp_group: Any) -> None:
        super().__init__()
        full = _Dense()
        rows = slice(tp_rank * 2 * D // tp_size, (tp_rank + 1) * 2 * D // tp_size)
        self.group = tp_group
        self.ln = full.ln
        self.fc1_weight = nn.Parameter(full.fc1.weight.detach()[rows].clone())
        self.fc1_bias = nn.Parameter(full.fc1.bias.detach()[rows].clone())
        self.fc2_weight = nn.Parameter(full.fc2.weight.detach()[:, rows].clone())
        self.fc2_bias = full.fc2.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _CopyToGroup.apply(self.ln(x), self.group)
        h = torch.relu(nn.functional.linear(h, self.fc1_weight, self.fc1_bias))
        partial = nn.functional.linear(h, self.fc2_weight)
        return _ReduceFromGroup.apply(partial, self.group) + self.fc2_bias

    def groups(self) -> list[dict[str, Any]]:
        sharded = [self.fc1_weight, self.fc1_bias, self.fc2_weight]
        duplicated = [*self.ln.parameters(), self.fc2_bias]
        return [{"params": sharded}, {"params": duplicated, "replicate_dims": ("dp", "tp")}]


class TensorParallelDDP(_Case):
    """Plain-tensor tensor parallelism over ``tp`` inside DDP over ``dp``. DDP's process group is
    a sub-group, so registering the DDP wrapper is not enough: the declaration says that sharded
    parameters are copies over dp only, and (param group) the duplicated ones over dp and tp."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.mesh = _mesh((2, 2), ("dp", "tp"))
        self.replicate_dims = ("dp",)
        self.dp_rank, self.tp_rank = self.mesh.get_coordinate()
        self.key = f"tp{self.tp_rank}"

    def build(self) -> tuple[nn.Module, list[dict[str, Any]]]:
        from torch.nn.parallel import DistributedDataParallel as DDP

        piece = _TensorParallelDense(self.tp_rank, 2, self.mesh["tp"].get_group())
        return DDP(piece, process_group=self.mesh["dp"].get_group()), piece.groups()

    def loss(self, model: nn.Module, step: int, scaler: Any, autocast: bool = True) -> None:
        x, y = batch(self.dp_rank, step)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = model(x)
        scaler.scale(loss_fn(out, y)).backward()

    def reference(self) -> list[torch.Tensor]:
        model = _Dense()
        losses = [loss_fn(model(x), y) for x, y in (batch(d, 0) for d in range(2))]
        (sum(losses) / 2).backward()
        return [p.grad for p in model.parameters()]

    def undeclared_kwargs(self) -> dict[str, Any]:
        return {}  # DDP registered (by ``undeclared``), no mesh: DDP's group is not the whole group


class _Experts(nn.Module):
    """The full model of the expert cases: a shared layer, then the sum of E experts."""

    def __init__(self, num_experts: int = 2) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.shared = nn.Linear(D, D)
        self.experts = nn.Parameter(torch.randn(num_experts, D, D) / D**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        return h + sum(torch.tanh(nn.functional.linear(h, w)) for w in self.experts)


class _ExpertParallel(nn.Module):
    """One expert-parallel rank's piece of ``_Experts``: the shared layer (a copy on every rank)
    and this rank's expert, as a plain tensor or a DTensor (Shard(0) over ``ep``)."""

    def __init__(self, mesh: Any, kind: str) -> None:
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        full = _Experts()
        self.ep_group = mesh["ep"].get_group()
        self.dp_group = mesh["dp"].get_group()
        self.shared = full.shared
        ep_rank = mesh.get_coordinate()[1]
        if kind == "plain":
            self.experts = nn.Parameter(full.experts.detach()[ep_rank : ep_rank + 1].clone())
        elif kind == "dtensor":  # on the whole (dp, ep) mesh: fully derived from placements
            self.experts = nn.Parameter(
                distribute_tensor(full.experts.detach(), mesh, [Replicate(), Shard(0)])
            )
        else:  # on the expert sub-mesh: the dp dim lies outside it
            self.experts = nn.Parameter(distribute_tensor(full.experts.detach(), mesh["ep"], [Shard(0)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        experts = self.experts.to_local() if hasattr(self.experts, "to_local") else self.experts
        routed = _CopyToGroup.apply(h, self.ep_group)  # every expert's input gradient reaches h
        partial = sum(torch.tanh(nn.functional.linear(routed, w)) for w in experts)
        return h + _ReduceFromGroup.apply(partial, self.ep_group)

    def sync_grads(self) -> None:
        """Average gradients over data-parallel replicas (what DDP or Megatron's DDP does)."""
        for p in self.parameters():
            grad = local(p.grad)
            dist.all_reduce(grad, group=self.dp_group)
            grad.div_(dist.get_world_size(self.dp_group))


class ExpertParallel(_Case):
    """Experts on an expert axis; the shared layer is a copy over both dims. ``kind``: "plain"
    (experts declared in their param group: copies over dp only), "dtensor" (derived) or
    "dtensor_submesh" (dp lies outside their mesh; the default declaration covers it)."""

    kind = "plain"

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.mesh = _mesh((2, 2), ("dp", "ep"))
        self.replicate_dims = ("dp", "ep")
        self.dp_rank, self.ep_rank = self.mesh.get_coordinate()
        # DTensor experts are one tensor across ep (DCP assembles its shards); plain ones are not.
        self.key = f"ep{self.ep_rank}" if self.kind == "plain" else "experts"

    def build(self) -> tuple[nn.Module, list[dict[str, Any]]]:
        model = _ExpertParallel(self.mesh, self.kind)
        experts: dict[str, Any] = {"params": [model.experts]}
        if self.kind == "plain":
            experts["replicate_dims"] = ("dp",)
        return model, [{"params": list(model.shared.parameters())}, experts]

    def loss(self, model: nn.Module, step: int, scaler: Any, autocast: bool = True) -> None:
        x, y = batch(self.dp_rank, step)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = model(x)
        scaler.scale(loss_fn(out, y)).backward()
        model.sync_grads()  # type: ignore[operator]

    def reference(self) -> list[torch.Tensor]:
        model = _Experts()
        losses = [loss_fn(model(x), y) for x, y in (batch(d, 0) for d in range(2))]
        (sum(losses) / 2).backward()
        return [p.grad for p in model.parameters()]


class ExpertParallelDTensor(ExpertParallel):
    kind = "dtensor"


class ExpertParallelSubMesh(ExpertParallel):
    kind = "dtensor_submesh"


LAYOUTS: dict[str, tuple[type[_Case], tuple[str, ...]]] = {
    "pp_fsdp2": (PipelineFSDP2, ("sgd", "adamw_fused")),
    "tp_ddp": (TensorParallelDDP, ("sgd", "adamw_fused")),
    "experts_plain": (ExpertParallel, ("sgd", "adamw_fused")),
    "experts_dtensor": (ExpertParallelDTensor, ("sgd",)),
    "experts_submesh": (ExpertParallelSubMesh, ("adamw_fused",)),
}


# ---------------------------------------------------------------------------- the checks (parent side)


def check_training(label: str, runs: list[dict[str, Any]], plants: dict[int, int], fused: bool) -> None:
    """Every rank: the same states; skipped exactly on the planted steps with a backoff; one
    collective per step; host reads (the first norm's layout check, then step()'s); resume."""
    for r in runs[1:]:
        assert r["states"] == runs[0]["states"], f"{label}: scale states differ across ranks"
    scales = [2.0**10] + [s["scale"] for s in runs[0]["states"]]
    for rank, r in enumerate(runs):
        assert r["stepped"] == [n not in plants for n in range(STEPS)], f"{label} rank {rank}: {r['stepped']}"
        assert r["collectives"] == [1] * STEPS, f"{label} rank {rank}: collectives {r['collectives']}"
        reads = [1] + [0 if fused else 1] * (STEPS - 1)
        assert r["host_reads"] == reads, f"{label} rank {rank}: host reads {r['host_reads']}"
        assert r["resumed_states"] == r["states"][RESUME_AT:], f"{label} rank {rank}: resumed state"
        assert all(torch.equal(a, b) for a, b in zip(r["final"], r["resumed_final"], strict=True)), (
            f"{label} rank {rank}: resumed parameters differ"
        )
    for n in plants:
        assert scales[n + 1] == scales[n] / 2, f"{label}: no backoff at step {n}: {scales}"
