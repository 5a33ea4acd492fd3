"""Every implementation the benchmark runs: the interface, distscale's rows and the peers' rows.

**Interface.** An implementation is built once per (scenario, variant) on the gradient list (outside timing) and
returns a ``run(scale)`` callable that does one scaler check on the list, the way that
implementation does it. ``run`` returns an :class:`Outcome` of device tensors (or whatever host
values the implementation itself produced); the harness reads them only after timing.

**distscale**: the local check through :mod:`distscale.kernels`, in its two modes.

- ``inplace``: check + unscale in place + norm (for optimizers that read plain gradients).
- ``readonly``: check + norm without writing (``inv_scale=None``: the unscale is folded into a
  fused optimizer's ``grad_scale``).

Both call ``kernels.check_(grads, found_inf, inv_scale, norm_type, backend=...)`` once per
(device, dtype) group, the backend resolved from the kernel choice for the group (one pass with
Triton; the norm is of the values as read, before unscale). On CUDA there are rows per kernel:
"auto", "triton" (when it runs) and "torch"; on CPU "auto" only.

**Peers** (bench/PERF.md), run in this process on the benchmark's gradient list:

1. ``torch-chain``: ``torch.amp.GradScaler.unscale_`` then ``torch.nn.utils.clip_grad_norm_(foreach=True)``
   (torch's own code; the parameters alias the gradients, so no extra memory).
2. ``torch-fused-check``: ``GradScaler._check_inf_per_device``, the check torch runs in ``step`` for
   optimizers with ``_step_supports_amp_scaling`` (the unscale kernel with inv_scale=1).
4. ``megatron-chain``: a re-implementation of megatron-core 0.16's ``_unscale_main_grads_and_check_for_nan``
   + ``get_grad_norm_fp32`` + ``clip_grad_by_total_norm_fp32``.
5. ``deepspeed-zero`` / ``deepspeed-legacy``: re-implementations of DeepSpeed ZeRO-1/2's overflow check
   (0.19's amax/amin test, and the ``x.float()`` + isnan/isinf test before PR #8325), fp64 norm and
   ``unscale_and_clip_grads``.

Peer 3 (ShardedGradScaler + FSDP clip) needs ranks: see :mod:`bench.steps`. On one process
the all-reduces of the re-implementations are identities (skipped), their ``.item()`` host reads
are real. The re-implementations use torch ops where the originals call apex/TE kernels
(``multi_tensor_l2norm`` → ``torch._foreach_norm``; ``multi_tensor_scale`` → ``torch._foreach_mul_``)
and ``_foreach_mul_`` where DeepSpeed multiplies its one flat partition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bench import measure
from bench.measure import Sizes
from distscale import kernels

# ---------------------------------------------------------------------------- impl


@dataclass(frozen=True)
class Scale:
    """One loss scale on the device: ``scale``, ``inv`` = 1/scale (0-dim float32) and its value."""

    scale: torch.Tensor
    inv: torch.Tensor
    inv_value: float

    @classmethod
    def of(cls, inv_value: float, device: torch.device) -> Scale:
        inv = torch.full((), inv_value, dtype=torch.float32, device=device)
        return cls(torch.full((), 1.0 / inv_value, dtype=torch.float32, device=device), inv, inv_value)


@dataclass
class Outcome:
    """found_inf (tensor(s) or bool) and the norm (tensor, float or None) an implementation produced."""

    found_inf: Any
    norm: Any = None


@dataclass(frozen=True)
class Context:
    """What builders need besides the gradients."""

    device: torch.device
    max_norm: float = 1.0


Run = Callable[[Scale], Outcome]
Builder = Callable[[list[torch.Tensor], Context], Run]


@dataclass(frozen=True)
class Impl:
    """One row family of the kernel table.

    Attributes:
        name: short id ("distscale-inplace", "torch-chain", ...).
        label: what it is, in words (re-implementations say so).
        family: "distscale" or "peer".
        mode: "inplace" / "readonly" for distscale rows, None for peers.
        mutates: whether it writes the gradients (then a planted row is refilled between reps).
        norm_kind: "scaled" (norm of the values as read), "unscaled" (after unscale) or None.
        traffic: bytes moved on one list, given whether the list overflows (peers skip passes).
        factor: the factor it applies to clean gradients, from (reference scaled norm, inv_scale,
            max_norm); checked against the float64 norm of the gradients afterwards.
        build: the builder.
    """

    name: str
    label: str
    family: str
    mode: str | None
    mutates: bool
    norm_kind: str | None
    traffic: Callable[[Sizes, bool], int]
    factor: Callable[[float, float, float], float]
    build: Builder


def group_by_dtype(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The (device, dtype) groups, in first-seen order, as every scaler forms them."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return list(groups.values())


def clip_factor(norm: float, max_norm: float) -> float:
    """torch's clip coefficient: clamp(max_norm / (norm + 1e-6), max=1)."""
    return min(1.0, max_norm / (norm + 1e-6))


# ---------------------------------------------------------------------------- ours

__all__ = ["api_name", "kernel_names", "ours", "triton_available"]

NORM_TYPE = 2.0


def api_name() -> str:
    """Which kernels API the distscale rows call (reported with the results)."""
    return "kernels.check_"


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``kernel="triton"`` rows can run here, and why not."""
    if device.type != "cuda":
        return False, "no CUDA device"
    try:
        probe = [torch.ones(8, device=device)]
        _group_norm(probe, torch.zeros((), device=device), None, "triton")
        torch.cuda.synchronize(device)
    except Exception as exc:
        return False, f"kernel='triton' failed: {type(exc).__name__}: {exc}"
    return True, ""


def _group_norm(
    grads: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor | None, kernel: str
) -> torch.Tensor:
    backend = kernels.backend(kernel, grads[0].device, grads[0].dtype)
    norm = kernels.check_(grads, found, inv, NORM_TYPE, backend=backend)
    assert norm is not None
    return norm


def _builder(kernel: str, inplace: bool) -> Callable[[list[torch.Tensor], Context], Run]:
    def build(grads: list[torch.Tensor], ctx: Context) -> Run:
        def run(scale: Scale) -> Outcome:
            found = torch.zeros((), dtype=torch.float32, device=ctx.device)
            norms = [
                _group_norm(group, found, scale.inv if inplace else None, kernel)
                for group in group_by_dtype(grads)
            ]
            total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), NORM_TYPE)
            return Outcome(found, total)

        return run

    return build


def _inplace_factor(ref: float, inv: float, max_norm: float) -> float:
    return inv


def _readonly_factor(ref: float, inv: float, max_norm: float) -> float:
    return 1.0


def kernel_names(device: torch.device) -> list[str]:
    """Kernels with rows: "auto" everywhere; on CUDA also "triton" (when it runs) and "torch"."""
    if device.type != "cuda":
        return ["auto"]  # on CPU, "auto" is "torch"
    return ["auto", "triton", "torch"] if triton_available(device)[0] else ["auto", "torch"]


def _resolved(kernel: str, device: torch.device) -> str:
    if kernel != "auto":
        return f"kernel={kernel}"
    return f"kernel=auto (fp32 → {kernels.backend('auto', device, torch.float32)})"


def ours(names: list[str], device: torch.device) -> list[Impl]:
    """The distscale rows for each kernel in ``names`` ("auto" is named without suffix)."""
    how = api_name()
    impls = []
    for kernel in names:
        suffix = "" if kernel == "auto" else f"-{kernel}"
        which = f"{how}, {_resolved(kernel, device)}"
        impls += [
            Impl(f"distscale-inplace{suffix}", f"distscale check + unscale + norm, {which}",
                 "distscale", "inplace", True, "scaled", measure.in_place, _inplace_factor,
                 _builder(kernel, True)),
            Impl(f"distscale-readonly{suffix}", f"distscale check + norm (folded unscale), {which}",
                 "distscale", "readonly", False, "scaled", measure.read_only, _readonly_factor,
                 _builder(kernel, False)),
        ]  # fmt: skip
    return impls


# ---------------------------------------------------------------------------- peers

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
         "peer", None, True, "unscaled", measure.torch_chain, _clip, build_torch_chain),
    Impl("torch-fused-check", "peer 2: torch fused-optimizer check (_check_inf_per_device, inv_scale=1)",
         "peer", None, True, None, measure.fused_check, _one, build_torch_fused_check),
    Impl("megatron-chain", "peer 4: Megatron-core 0.16 unscale/check → all-reduce → .item() → norm → "
         "all-reduce → .item() → scale (re-implementation)",
         "peer", None, True, "unscaled", measure.megatron, _megatron_factor, build_megatron),
    Impl("deepspeed-zero", "peer 5: DeepSpeed 0.19 ZeRO-1/2 amax/amin check → .item() → fp64 norm → "
         "unscale_and_clip (re-implementation)",
         "peer", None, True, "scaled", measure.deepspeed, _deepspeed_factor, build_deepspeed),
    Impl("deepspeed-legacy", "peer 5: DeepSpeed ZeRO-1/2 before PR #8325: x.float() + isnan/isinf per "
         "tensor, fp64 norm (re-implementation)",
         "peer", None, True, "scaled", measure.deepspeed_legacy, _deepspeed_factor, build_deepspeed_legacy),
]  # fmt: skip
