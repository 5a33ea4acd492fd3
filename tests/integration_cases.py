"""Spawned-rank jobs of the framework integration tests (2 gloo ranks each, CPU, fp16 autocast):
the framework's own training loop, an inf planted in one rank's gradient after backward."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

INF = float("inf")
PLANT_STEP, PLANT_RANK = 2, 1


def _framework_env(rank: int, world: int) -> None:
    # What torchrun would export: the frameworks read it (the process group already exists).
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def job_accelerate(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """accelerate's DDP loop with distscale installed before and after prepare(), plain and fused
    AdamW, clipping with accelerator.clip_grad_norm_; then save_state and load_state into a fresh
    accelerator."""
    _framework_env(rank, world)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from distscale.integrations.accelerate import use_distscale

    out: dict[str, Any] = {}
    for when in ("before", "after"):
        for fused in (False, True):
            AcceleratorState._reset_state(True)  # one accelerator per case in this process
            accelerator = Accelerator(mixed_precision="fp16", cpu=True)
            model = _model()
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            if when == "before":
                scaler = use_distscale(accelerator, init_scale=2.0**10, growth_interval=3)
            model, opt, sched = accelerator.prepare(model, opt, sched)
            if when == "after":
                scaler = use_distscale(accelerator, init_scale=2.0**10, growth_interval=3)
            compute: list[torch.dtype] = []  # the first layer's dtype (prepare() returns fp32 outputs)
            accelerator.unwrap_model(model)[0].register_forward_hook(
                lambda module, args, output, seen=compute: seen.append(output.dtype)
            )
            steps = []
            for step in range(5):
                output = model(_batch(rank, step))  # no explicit autocast: prepare()'s wrapper
                accelerator.backward(output.float().pow(2).mean())
                if step == PLANT_STEP and rank == PLANT_RANK:
                    next(model.parameters()).grad.view(-1)[0] = INF
                norm = accelerator.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                sched.step()
                opt.zero_grad()
                steps.append(
                    {
                        "skipped": opt.step_was_skipped,
                        "accelerator_skipped": accelerator.optimizer_step_was_skipped,
                        "scale": scaler.get_scale(),
                        "lr": sched.get_last_lr()[0],
                        "compute_dtype": str(compute[-1]),
                        "norm": float(norm),
                        "scaler_norm": scaler.metrics()["grad_norm"],  # set by distscale's clip only
                    }
                )
            case = f"{when}-{'fused' if fused else 'plain'}"
            out[case] = {
                "steps": steps,
                "params": [p.detach().tolist() for p in model.parameters()],
                "accelerator_scaler_is_ours": accelerator.scaler is scaler and opt.scaler is scaler,
            }
            if case == "after-fused":  # save here, load into a fresh accelerator below
                accelerator.save_state(ckpt_root)
                out["saved"] = scaler.state_dict()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    scaler = use_distscale(accelerator)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model, opt = accelerator.prepare(model, opt)
    accelerator.load_state(ckpt_root)
    out["loaded"] = scaler.state_dict()
    return out


class _TrainerModel(nn.Module):
    """What the Trainer needs: a forward taking the batch's keys and returning the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": (out.float() - y).pow(2).mean(), "logits": out}


class _TrainerData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(8, generator=g), "y": torch.randn(4, generator=g)}


def _record_trainer_steps(callback_base: type) -> Any:
    """A TrainerCallback that records each step's skip, scale and LR."""

    class Record(callback_base):  # type: ignore[misc,valid-type]
        trainer: Any = None

        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            accelerator = self.trainer.accelerator
            self.steps.append(
                {
                    "skipped": accelerator.optimizer_step_was_skipped,
                    "scale": accelerator.scaler.get_scale(),
                    "lr": self.trainer.lr_scheduler.get_last_lr()[0],
                }
            )

    return Record()


def job_trainer(rank: int, world: int, output_root: str) -> dict[str, Any]:
    """The transformers Trainer (fp16, CPU, DDP over 2 ranks), its default fused AdamW and the
    plain one, a linear LR schedule; an inf on rank 1's grads at the 3rd step; then a resume from
    the Trainer's own checkpoint."""
    _framework_env(rank, world)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from distscale.integrations.transformers import use_distscale

    def arguments(optim: str, output_dir: str, **kwargs: Any) -> Any:
        return TrainingArguments(
            output_dir=output_dir, fp16=True, use_cpu=True, per_device_train_batch_size=4, max_steps=5,
            learning_rate=0.1, lr_scheduler_type="linear", optim=optim, report_to=[], logging_steps=1,
            max_grad_norm=1.0, dataloader_num_workers=0, disable_tqdm=True, **kwargs,
        )  # fmt: skip

    class PlantingTrainer(Trainer):  # type: ignore[misc,valid-type]
        # After the backward (and DDP's all-reduce), before the Trainer unscales for its grad norm.
        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(model, inputs, *args, **kwargs)
            if self.state.global_step == PLANT_STEP and rank == PLANT_RANK:
                self.accelerator.unwrap_model(model).net[0].weight.grad.view(-1)[0] = INF
            return loss

    out: dict[str, Any] = {}
    for optim in ("adamw_torch_fused", "adamw_torch"):
        model = _TrainerModel()
        record = _record_trainer_steps(TrainerCallback)

        output_dir = f"{output_root}/{optim}"
        args = arguments(optim, output_dir, save_strategy="steps", save_steps=5)
        trainer = record.trainer = PlantingTrainer(
            model=model, args=args, train_dataset=_TrainerData(), callbacks=[record]
        )
        scaler = use_distscale(trainer, init_scale=2.0**10)
        trainer.train()
        out[optim] = {
            "steps": record.steps,
            "params": [p.detach().tolist() for p in model.parameters()],
            "state": scaler.state_dict(),
        }
    # Resume from the fused run's checkpoint: the Trainer loads the scaler state it saved.
    resumed = Trainer(
        model=_TrainerModel(),
        args=arguments("adamw_torch_fused", f"{output_root}/resumed"),
        train_dataset=_TrainerData(),
    )
    scaler = use_distscale(resumed)
    resumed.train(resume_from_checkpoint=f"{output_root}/adamw_torch_fused/checkpoint-5")
    out["resumed_state"] = scaler.state_dict()
    return out


def _lightning_env(rank: int, world: int) -> None:
    # torchrun's variables: Lightning then joins the existing process group instead of launching.
    _framework_env(rank, world)
    os.environ.update(GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")


def job_lightning_trainer(rank: int, world: int, ckpt_path: str) -> dict[str, Any]:
    """The Lightning Trainer (DDP over 2 gloo ranks, "16-mixed" on the CPU through the plugin),
    fused and plain AdamW, clipping by norm, a per-step LambdaLR; an inf on rank 1 after backward;
    then a resume from the Trainer's checkpoint."""
    _lightning_env(rank, world)
    import lightning

    from distscale.integrations.lightning import DistscalePrecision

    class Module(lightning.LightningModule):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            self.net, self.fused = _model(), fused
            self.steps: list[dict[str, Any]] = []
            self.compute: list[str] = []
            self.net[0].register_forward_hook(
                lambda module, args, output: self.compute.append(str(output.dtype))
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch).float().pow(2).mean()

        def on_after_backward(self) -> None:  # after DDP's all-reduce, before the step
            if self.global_step == PLANT_STEP and self.global_rank == PLANT_RANK:
                self.net[0].weight.grad.view(-1)[0] = INF

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            scaler = self.trainer.precision_plugin.scaler
            self.steps.append(
                {
                    "skipped": scaler.last_step_skipped(),
                    "scale": scaler.get_scale(),
                    "lr": self.lr_schedulers().get_last_lr()[0],
                }
            )

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self) -> Any:
            batches = torch.stack([_batch(self.global_rank, step) for step in range(5)])
            return torch.utils.data.DataLoader(batches, batch_size=None)  # this rank's 5 batches

    def trainer(**kwargs: Any) -> Any:
        return lightning.Trainer(
            accelerator="cpu", devices=world, strategy="ddp", max_steps=5, gradient_clip_val=1.0,
            plugins=[DistscalePrecision("cpu", init_scale=2.0**10, growth_interval=3)], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, **kwargs,
        )  # fmt: skip

    out: dict[str, Any] = {}
    for fused in (True, False):
        module = Module(fused)
        fit = trainer()
        fit.fit(module)
        out["fused" if fused else "plain"] = {
            "steps": module.steps,
            "compute": sorted(set(module.compute)),
            "params": [p.detach().tolist() for p in module.parameters()],
            "state": fit.precision_plugin.scaler.state_dict(),
        }
        if not fused:
            fit.save_checkpoint(ckpt_path)
    resumed = trainer()
    resumed.fit(Module(False), ckpt_path=ckpt_path)
    out["resumed_state"] = resumed.precision_plugin.scaler.state_dict()
    return out


def job_lightning_fabric(rank: int, world: int) -> dict[str, Any]:
    """Fabric (DDP over 2 gloo ranks) with a fused AdamW and fabric.clip_gradients."""
    _lightning_env(rank, world)
    import lightning

    from distscale.integrations.lightning import DistscaleFabricPrecision

    fabric = lightning.Fabric(
        accelerator="cpu", devices=world, strategy="ddp",
        plugins=[DistscaleFabricPrecision("cpu", init_scale=2.0**10, growth_interval=3)],
    )  # fmt: skip
    fabric.launch()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model, opt = fabric.setup(model, opt)
    scaler = fabric._precision.scaler
    steps = []
    for step in range(5):
        opt.zero_grad()
        loss = model(_batch(rank, step)).float().pow(2).mean()
        fabric.backward(loss)
        if step == PLANT_STEP and rank == PLANT_RANK:
            next(model.parameters()).grad.view(-1)[0] = INF
        # Lightning's default raises on a non-finite norm, on the overflowing rank alone.
        fabric.clip_gradients(model, opt, max_norm=1.0, error_if_nonfinite=False)
        opt.step()
        steps.append({"skipped": scaler.last_step_skipped(), "scale": scaler.get_scale()})
    return {"steps": steps, "params": [p.detach().tolist() for p in model.parameters()]}


def _shard(module: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in module.net:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _plant_in_shard(param: torch.Tensor) -> None:
    param.grad._local_tensor.view(-1)[0] = INF  # this rank's shard of a DTensor gradient


def _run_sharded_trainer(
    lightning: Any,
    world: int,
    strategy: Any,
    plugin: Any,
    configure: Any,
    plant: Any,
    ckpt: str,
) -> tuple[Any, dict[str, Any]]:
    """Fit the Lightning Trainer 5 steps with ``strategy()`` and ``plugin()``: fused AdamW, clipping
    by norm, this rank's 5 batches, ``configure(module)`` in ``configure_model`` and ``plant(module)``
    after backward at PLANT_STEP on PLANT_RANK; save its checkpoint at ``ckpt`` and resume one more
    step from it. Returns the fitted module and its record: per-step decisions and scales, and the
    resumed run's ``num_updates`` and steps."""

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()
            self.steps: list[dict[str, Any]] = []

        def configure_model(self) -> None:
            configure(self)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch).float().pow(2).mean()

        def on_after_backward(self) -> None:
            if self.global_step == PLANT_STEP and self.global_rank == PLANT_RANK:
                plant(self)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            scaler = self.trainer.precision_plugin.scaler
            self.steps.append({"skipped": scaler.last_step_skipped(), "scale": scaler.get_scale()})

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)

        def train_dataloader(self) -> Any:
            batches = torch.stack([_batch(self.global_rank, step) for step in range(5)])
            return torch.utils.data.DataLoader(batches, batch_size=None)

    def trainer(max_steps: int) -> Any:
        return lightning.Trainer(
            accelerator="cpu", devices=world, strategy=strategy(), plugins=[plugin()], max_steps=max_steps,
            gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False,
        )  # fmt: skip

    module = Module()
    fit = trainer(5)
    fit.fit(module)
    fit.save_checkpoint(ckpt)
    resumed = trainer(6)
    resumed.fit(Module(), ckpt_path=ckpt)
    return module, {
        "steps": module.steps,
        "resumed_start": resumed.precision_plugin.scaler.state_dict()["state"]["num_updates"],
        "resumed_steps": resumed.lightning_module.steps,
    }


def job_lightning_model_parallel(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """Lightning's ModelParallelStrategy (FSDP2 over 2 gloo ranks, the plugin's fp16 on the CPU) in
    the Trainer, fused AdamW, clipping by norm, an inf in rank 1's shard after backward, a resume
    from the Trainer's sharded checkpoint; then Fabric with the same strategy, its sharded
    save and load."""
    _lightning_env(rank, world)
    import lightning
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel
    from lightning.pytorch.strategies import ModelParallelStrategy

    from distscale.integrations.lightning import DistscaleFabricPrecision, DistscalePrecision, fabric_load

    module, trainer_record = _run_sharded_trainer(
        lightning,
        world,
        # "auto" would make the 2 ranks a tensor-parallel dim (and the FSDP mesh one rank).
        lambda: ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        lambda: DistscalePrecision("cpu", init_scale=2.0**10, growth_interval=3),
        lambda m: _shard(m, m.device_mesh["data_parallel"]),
        lambda m: _plant_in_shard(m.net[0].weight),
        f"{ckpt_root}/trainer",  # sharded: one directory, a file per rank
    )
    trainer_record["param_type"] = type(next(module.parameters())).__name__
    trainer_record["params"] = [p.full_tensor().tolist() for p in module.parameters()]  # every rank joins

    # Fabric, the same strategy through its parallelize_fn.
    fabric = lightning.Fabric(
        accelerator="cpu", devices=world,
        strategy=FabricModelParallel(
            parallelize_fn=lambda m, mesh: _shard(m, mesh["data_parallel"]),
            data_parallel_size=world, tensor_parallel_size=1,
        ),
        plugins=[DistscaleFabricPrecision("cpu", init_scale=2.0**10, growth_interval=3)],
    )  # fmt: skip
    fabric.launch()
    holder = nn.Module()
    holder.net = _model()
    model = fabric.setup_module(holder)
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    scaler = fabric._precision.scaler
    steps = []
    for step in range(5):
        opt.zero_grad()
        fabric.backward(model.net(_batch(rank, step)).float().pow(2).mean())
        if step == PLANT_STEP and rank == PLANT_RANK:
            _plant_in_shard(model.net[0].weight)
        norm = scaler.clip_grad_norm_(opt.optimizer, 1.0)
        opt.step()
        steps.append(
            {"skipped": scaler.last_step_skipped(), "scale": scaler.get_scale(), "norm": float(norm)}
        )
    fabric.save(f"{ckpt_root}/fabric", {"model": model, "optimizer": opt, "scaler": scaler})
    saved = scaler.state_dict()
    fresh = DistscaleFabricPrecision("cpu").scaler
    fresh_holder = nn.Module()
    fresh_holder.net = _model()
    fresh_model = fabric.setup_module(fresh_holder)
    fresh_opt = fabric.setup_optimizers(torch.optim.AdamW(fresh_model.parameters(), lr=0.1, fused=True))
    loaded = {"model": fresh_model, "optimizer": fresh_opt, "scaler": fresh}
    fabric_load(fabric, f"{ckpt_root}/fabric", loaded)
    return {
        "trainer": trainer_record,
        "fabric": {
            "steps": steps,
            "saved": saved,
            "loaded": fresh.state_dict(),
            "scaler_kept": loaded["scaler"] is fresh,
            "params_equal": all(
                torch.equal(a.full_tensor(), b.full_tensor())
                for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True)
            ),
        },
    }


def _plant_in_local_grad(module: nn.Module) -> None:
    """An inf in the first non-empty local gradient (FSDP1: this rank's shard)."""
    for p in module.parameters():
        if p.grad is not None and p.grad.numel():
            p.grad.view(-1)[0] = INF
            return
    raise AssertionError("no local gradient to plant into")


def job_lightning_fsdp1(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """Lightning's FSDP (FSDP1) strategy with distscale's FSDP plugins over 2 gloo ranks: the
    Trainer (fused AdamW, clipping by norm, an inf in rank 1's shard, its checkpoint and resume),
    then Fabric (clip through the scaler, a sharded save, fabric_load)."""
    _lightning_env(rank, world)
    import lightning
    from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
    from lightning.pytorch.strategies import FSDPStrategy

    from distscale.integrations.lightning import (
        DistscaleFabricFSDPPrecision,
        DistscaleFSDPPrecision,
        fabric_load,
    )

    # Subclasses only because Lightning refuses accelerator="cpu" for the exact FSDPStrategy type
    # (a `type(...) is` check); everything else is Lightning's own FSDP strategy. The model is
    # wrapped by hand (Lightning's documented manual wrapping; the strategy keeps it as is):
    # Lightning would pass FSDP1 no device on the CPU, which FSDP1 refuses.
    class CPUFSDP(FSDPStrategy):
        pass

    class CPUFabricFSDP(FabricFSDP):
        pass

    def wrapped(module: nn.Module, precision: Any) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module, device_id=torch.device("cpu"), mixed_precision=precision.mixed_precision_config
        )

    module, trainer_record = _run_sharded_trainer(
        lightning,
        world,
        lambda: CPUFSDP(state_dict_type="sharded"),
        lambda: DistscaleFSDPPrecision("cpu", init_scale=2.0**10, growth_interval=3),
        lambda m: setattr(m, "net", wrapped(m.net, m.trainer.precision_plugin)),
        _plant_in_local_grad,
        f"{ckpt_root}/trainer.ckpt",
    )
    trainer_record["wrapped"] = type(module.net).__name__

    fabric = lightning.Fabric(
        accelerator="cpu", devices=world, strategy=CPUFabricFSDP(state_dict_type="sharded"),
        plugins=[DistscaleFabricFSDPPrecision("cpu", init_scale=2.0**10, growth_interval=3)],
    )  # fmt: skip
    fabric.launch()
    model = fabric.setup_module(wrapped(_model(), fabric._precision))
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    scaler = fabric._precision.scaler
    steps = []
    for step in range(5):
        opt.zero_grad()
        fabric.backward(model(_batch(rank, step)).float().pow(2).mean())
        if step == PLANT_STEP and rank == PLANT_RANK:
            _plant_in_local_grad(model)
        norm = scaler.clip_grad_norm_(opt.optimizer, 1.0)
        opt.step()
        steps.append(
            {"skipped": scaler.last_step_skipped(), "scale": scaler.get_scale(), "norm": float(norm)}
        )
    fabric.save(f"{ckpt_root}/fabric", {"model": model, "optimizer": opt, "scaler": scaler})
    fresh = DistscaleFabricFSDPPrecision("cpu").scaler
    fresh_model = fabric.setup_module(wrapped(_model(), fabric._precision))
    fresh_opt = fabric.setup_optimizers(torch.optim.AdamW(fresh_model.parameters(), lr=0.1, fused=True))
    fabric_load(
        fabric, f"{ckpt_root}/fabric", {"model": fresh_model, "optimizer": fresh_opt, "scaler": fresh}
    )
    return {
        "trainer": trainer_record,
        "fabric": {
            "steps": steps,
            "saved": scaler.state_dict(),
            "loaded": fresh.state_dict(),
            "params_equal": all(
                torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True)
            ),
        },
    }
