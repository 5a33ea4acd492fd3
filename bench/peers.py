"""The peers of PERF.md, run in this process on the benchmark's gradient list.

1. ``torch-chain``: ``torch.amp.GradScaler.unscale_`` then ``torch.nn.utils.clip_grad_norm_(foreach=True)``
   (torch's own code; the parameters alias the gradients, so no extra memory).
2. ``torch-fused-check``: ``GradScaler._check_inf_per_device``, the check torch runs in ``step`` for
   optimizers with ``_step_supports_amp_scaling`` (the unscale kernel with inv_scale=1).
4. ``megatron-chain``: a re-implementation of megatron-core 0.16's ``_unscale_main_grads_and_check_for_nan``
   + ``get_grad_norm_fp32`` + ``clip_grad_by_total_norm_fp32``.
5. ``deepspeed-zero`` / ``deepspeed-legacy``: re-implementations of DeepSpeed ZeRO-1/2's overflow check
   (0.19's amax/amin test, and the ``x.float()`` + isnan/isinf test before PR #8325), fp64 norm and
   ``unscale_and_clip_grads``.

Peer 3 (ShardedGradScaler + FSDP clip) needs ranks: see :mod:`bench.multirank`. On one process
the all-reduces of the re-implementations are identities (skipped), their ``.item()`` host reads
are real. The re-implementations use torch ops where the originals call apex/TE kernels
(``multi_tensor_l2norm`` → ``torch._foreach_norm``; ``multi_tensor_scale`` → ``torch._foreach_mul_``)
and ``_foreach_mul_`` where DeepSpeed multiplies its one flat partition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from bench import traffic
from bench.impl import Builder, Context, Impl, Outcome, Run, Scale, clip_factor, group_by_dtype

__all__ = ["PEERS"]


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
    """The re-implementations' all-reduce: a real one under torch.distributed, else the identity."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)


def _aliasing_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters sharing each gradient's storage, with ``.grad`` set to it (no extra memory)."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(g.detach())
        p.grad = g
        params.append(p)
    return params


def _torch_scaler(
    grads: list[torch.Tensor], ctx: Context
) -> tuple[torch.amp.GradScaler, torch.optim.Optimizer]:
    params = _aliasing_params(grads)
    scaler = torch.amp.GradScaler(ctx.device.type)
    scaler._lazy_init_scale_growth_tracker(ctx.device)
    return scaler, torch.optim.SGD(params, lr=0.0)


def _found_per_device(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())


# ---------------------------------------------------------------------------- peer 1


def build_torch_chain(grads: list[torch.Tensor], ctx: Context) -> Run:
    scaler, opt = _torch_scaler(grads, ctx)
    params = [p for group in opt.param_groups for p in group["params"]]
    # unscale_ refuses fp16 gradients; for those, run its body with allow_fp16=True
    # (what ShardedGradScaler does) instead of reporting an error.
    allow_fp16 = any(g.dtype == torch.float16 for g in grads)

    def run(scale: Scale) -> Outcome:
        scaler._scale = scale.scale
        scaler._per_optimizer_states.clear()  # what update() leaves behind
        if allow_fp16:
            inv_scale = scaler._scale.double().reciprocal().float()
            found_inf = torch.full((), 0.0, dtype=torch.float32, device=ctx.device)
            state = scaler._per_optimizer_states[id(opt)]
            state["found_inf_per_device"] = scaler._unscale_grads_(opt, inv_scale, found_inf, True)
        else:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, ctx.max_norm, foreach=True)
        return Outcome(_found_per_device(scaler, opt), norm)

    return run


# ---------------------------------------------------------------------------- peer 2


def build_torch_fused_check(grads: list[torch.Tensor], ctx: Context) -> Run:
    scaler, opt = _torch_scaler(grads, ctx)

    def run(scale: Scale) -> Outcome:
        scaler._per_optimizer_states.clear()  # what update() leaves behind
        return Outcome(list(scaler._check_inf_per_device(opt).values()))

    return run


# ---------------------------------------------------------------------------- peer 4


def build_megatron(grads: list[torch.Tensor], ctx: Context) -> Run:
    found_inf = torch.zeros(1, dtype=torch.float32, device=ctx.device)  # MixedPrecisionOptimizer.found_inf

    def run(scale: Scale) -> Outcome:
        # _unscale_main_grads_and_check_for_nan (Megatron has one fp32 group; we group by dtype)
        groups = group_by_dtype(grads)
        found_inf.fill_(0.0)
        for group in groups:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, scale.inv)
        _all_reduce(found_inf, dist.ReduceOp.MAX)
        if found_inf.item() > 0:
            return Outcome(True)
        # get_grad_norm_fp32, norm_type 2: multi_tensor_l2norm over the list, ** 2, all-reduce SUM
        per_tensor = [n for group in groups for n in torch._foreach_norm(group, 2.0, dtype=torch.float32)]
        grad_norm = torch.linalg.vector_norm(torch.stack(per_tensor), 2.0)
        total = grad_norm**2.0
        _all_reduce(total, dist.ReduceOp.SUM)
        total_norm = total.item() ** 0.5
        # clip_grad_by_total_norm_fp32: multi_tensor_scale in place when the coefficient is < 1
        clip_coeff = ctx.max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for group in groups:
                torch._foreach_mul_(group, clip_coeff)
        return Outcome(False, total_norm)

    return run


# ---------------------------------------------------------------------------- peer 5


def _has_inf_or_nan(x: torch.Tensor) -> torch.Tensor:
    """deepspeed.runtime.utils.has_inf_or_nan (0.19): two scalar reductions, no O(P) temporaries."""
    if x.numel() == 0:
        return torch.tensor(False, device=x.device)
    return torch.isfinite(x.amax()).logical_and(torch.isfinite(x.amin())).logical_not()


def _has_inf_or_nan_legacy(x: torch.Tensor) -> torch.Tensor:
    """The check before DeepSpeed PR #8325: fp32 copy and three boolean masks per tensor."""
    float_x = x.float()
    return float_x.isnan().logical_or(float_x.isinf()).float().max()


def _deepspeed_builder(check: Callable[[torch.Tensor], torch.Tensor]) -> Builder:
    def build(grads: list[torch.Tensor], ctx: Context) -> Run:
        device = ctx.device

        def run(scale: Scale) -> Outcome:
            loss_scale = 1.0 / scale.inv_value  # DeepSpeed's loss_scale is a Python float
            # has_overflow_partitioned_grads_serial + has_overflow: accumulate, all-reduce MAX, .item()
            invalid = torch.zeros([1], dtype=torch.float, device=device)
            for g in grads:
                invalid += check(g)
            overflow_gpu = invalid.bool().byte()
            _all_reduce(overflow_gpu, dist.ReduceOp.MAX)
            if bool(overflow_gpu[0].item()):
                return Outcome(True)
            # get_grad_norm_direct: per-tensor fp64 norm, stack.pow.sum, all-reduce SUM, pow(1/2)
            norms = [torch.linalg.vector_norm(g.to(torch.float64), ord=2.0).to(device) for g in grads]
            total = torch.stack(norms).pow(2.0).sum().float()
            _all_reduce(total, dist.ReduceOp.SUM)
            total = total.pow(1.0 / 2.0)
            total.masked_fill_(total.isnan().logical_or(total.isinf()), -1.0)
            # step(): is_invalid_grad_norm (a host read) marks overflow
            if bool((~torch.isfinite(total) | (total < 0)).any()):
                return Outcome(True, total)
            # unscale_and_clip_grads: combined = clamp(((norm / ls) + 1e-6) / clip, min=1) * ls
            clip = torch.clamp(((total / loss_scale) + 1e-6) / ctx.max_norm, min=1.0)
            factor = 1.0 / (clip * loss_scale)
            for group in group_by_dtype(grads):
                torch._foreach_mul_(group, factor)
            return Outcome(False, total)

        return run

    return build


build_deepspeed = _deepspeed_builder(_has_inf_or_nan)
build_deepspeed_legacy = _deepspeed_builder(_has_inf_or_nan_legacy)


# ---------------------------------------------------------------------------- registry


def _clip(ref: float, inv: float, max_norm: float) -> float:
    return inv * clip_factor(ref * inv, max_norm)


def _megatron_factor(ref: float, inv: float, max_norm: float) -> float:
    coeff = max_norm / (ref * inv + 1e-6)
    return inv * (coeff if coeff < 1.0 else 1.0)


def _deepspeed_factor(ref: float, inv: float, max_norm: float) -> float:
    return inv / max((ref * inv + 1e-6) / max_norm, 1.0)


def _one(ref: float, inv: float, max_norm: float) -> float:
    return 1.0


PEERS: list[Impl] = [
    Impl("torch-chain", "peer 1: torch.amp.GradScaler.unscale_ + clip_grad_norm_(foreach=True)",
         "peer", None, True, "unscaled", traffic.torch_chain, _clip, build_torch_chain),
    Impl("torch-fused-check", "peer 2: torch fused-optimizer check (_check_inf_per_device, inv_scale=1)",
         "peer", None, True, None, traffic.fused_check, _one, build_torch_fused_check),
    Impl("megatron-chain", "peer 4: Megatron-core 0.16 unscale/check → all-reduce → .item() → norm → "
         "all-reduce → .item() → scale (re-implementation)",
         "peer", None, True, "unscaled", traffic.megatron, _megatron_factor, build_megatron),
    Impl("deepspeed-zero", "peer 5: DeepSpeed 0.19 ZeRO-1/2 amax/amin check → .item() → fp64 norm → "
         "unscale_and_clip (re-implementation)",
         "peer", None, True, "scaled", traffic.deepspeed, _deepspeed_factor, build_deepspeed),
    Impl("deepspeed-legacy", "peer 5: DeepSpeed ZeRO-1/2 before PR #8325: x.float() + isnan/isinf per "
         "tensor, fp64 norm (re-implementation)",
         "peer", None, True, "scaled", traffic.deepspeed_legacy, _deepspeed_factor, build_deepspeed_legacy),
]  # fmt: skip
