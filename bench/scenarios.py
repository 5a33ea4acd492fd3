"""The gradient lists of bench/PERF.md (S1–S5) at GPU, CPU and quick sizes, and how to fill them.

Shapes are generated from the architectures (GPT-2 124M: 148 tensors; Llama-2-7B: 291 tensors,
full and as rank 0's FSDP2 ``Shard(0)`` piece of an 8-way shard). GPU sizes are bench/PERF.md's; CPU
sizes keep the tensor counts and shrink the elements so a run fits in minutes on two cores.
Every list is filled with normal random values (never zeros); a variant may then plant an inf in
the first element of the first tensor or a NaN in the last element of the last tensor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]

VARIANTS: tuple[str, ...] = ("clean", "inf@first", "nan@last")
PROFILES: tuple[str, ...] = ("gpu", "cpu", "quick")


@dataclass(frozen=True)
class Scenario:
    """One gradient list: shapes and one dtype per tensor."""

    group: str  # "S1".."S5"
    name: str
    desc: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def id(self) -> str:
        return f"{self.group}:{self.name}"

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True))

    @property
    def largest_tensor_elements(self) -> int:
        return max(math.prod(s) for s in self.shapes)

    def dtype_names(self) -> list[str]:
        return sorted({str(d).removeprefix("torch.") for d in self.dtypes})

    def matches(self, token: str) -> bool:
        """Whether a ``--scenarios`` token (group, name or id, any case) selects this scenario."""
        token = token.lower()
        return token in (self.group.lower(), self.name.lower(), self.id.lower())


def _scenario(group: str, name: str, desc: str, shapes: Sequence[Shape], dtype: torch.dtype) -> Scenario:
    return Scenario(group, name, desc, tuple(shapes), (dtype,) * len(shapes))


# ---------------------------------------------------------------------------- architectures


def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> list[Shape]:
    """HF GPT-2 parameters (Conv1D weights are (in, out); lm_head tied): 2 + 12·layers + 2 tensors."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return [*shapes, (d,), (d,)]  # ln_f


def llama_shapes(d: int = 4096, layers: int = 32, vocab: int = 32000, ffn: int = 11008) -> list[Shape]:
    """Llama-2 parameters (untied lm_head): 1 + 9·layers + 2 tensors."""
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]  # q k v o, gate up down, 2 norms
    return [*shapes, (d,), (vocab, d)]


def fsdp_shard(shapes: Sequence[Shape], world: int, rank: int = 0) -> list[Shape]:
    """The local piece of each tensor under FSDP2's ``Shard(0)`` (``torch.chunk`` along dim 0)."""
    out: list[Shape] = []
    for shape in shapes:
        chunk = -(-shape[0] // world)
        rows = max(0, min(chunk, shape[0] - rank * chunk))
        out.append((rows, *shape[1:]))
    return out


def mixed_sizes(n: int, small_max: int, large_lo: int, large_hi: int, seed: int = 0) -> list[Shape]:
    """``n`` 1-D tensors: 60 % of 1..small_max elements (norms, biases), 40 % log-uniform in
    [large_lo, large_hi] (matrices), in a shuffled order."""
    rng = random.Random(seed)
    n_small = round(0.6 * n)
    sizes = [rng.randint(1, small_max) for _ in range(n_small)]
    sizes += [int(math.exp(rng.uniform(math.log(large_lo), math.log(large_hi)))) for _ in range(n - n_small)]
    rng.shuffle(sizes)
    return [(s,) for s in sizes]


def _mixed_dtypes(shapes: Sequence[Shape]) -> tuple[torch.dtype, ...]:
    cycle = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(cycle[i % 3] for i in range(len(shapes)))


# ---------------------------------------------------------------------------- profiles


def _gpu() -> list[Scenario]:
    f32 = torch.float32
    mib = 1 << 20
    gpt2, llama = gpt2_shapes(), llama_shapes()
    return [
        _scenario("S1", "flat-125M", "one flat buffer, 125M fp32", [(125_000_000,)], f32),
        _scenario("S1", "flat-1B", "one flat buffer, 1B fp32", [(1_000_000_000,)], f32),
        _scenario("S2", "buckets-16x256MB", "16 buckets of 256 MiB fp32", [(256 * mib // 4,)] * 16, f32),
        _scenario("S2", "buckets-64x25MB", "64 buckets of 25 MiB fp32", [(25 * mib // 4,)] * 64, f32),
        _scenario("S3", "gpt2-124m", "GPT-2 124M, 148 tensors, fp32", gpt2, f32),
        _scenario("S3", "llama2-7b", "Llama-2-7B, 291 tensors, fp32 (size-gated)", llama, f32),
        _scenario("S3", "llama2-7b-fsdp8", "Llama-2-7B rank-0 FSDP2 shard of 8", fsdp_shard(llama, 8), f32),
        _scenario("S4", "mixed-1000", "1000 tensors: 60% <=4K, 40% 1M-16M", mixed_sizes(1000, 4096, 1 << 20, 1 << 24), f32),
        _scenario("S4", "10000x64", "10,000 tensors of 64", [(64,)] * 10_000, f32),
        _scenario("S4", "2000x1M", "2,000 tensors of 1M (#133586)", [(1 << 20,)] * 2000, f32),
        Scenario("S5", "mixed-dtypes-gpt2", "GPT-2 124M shapes, fp32/fp16/bf16 round-robin", tuple(gpt2), _mixed_dtypes(gpt2)),
    ]  # fmt: skip


def _cpu() -> list[Scenario]:
    f32 = torch.float32
    gpt2 = gpt2_shapes(d=128, vocab=4096, ctx=256)
    llama = llama_shapes(d=128, vocab=2048, ffn=344)
    return [
        _scenario("S1", "flat-1M", "one flat buffer, 1M fp32", [(1 << 20,)], f32),
        _scenario("S1", "flat-8M", "one flat buffer, 8M fp32", [(8 << 20,)], f32),
        _scenario("S2", "buckets-16x1MB", "16 buckets of 1 MiB fp32", [(1 << 18,)] * 16, f32),
        _scenario("S2", "buckets-64x256KB", "64 buckets of 256 KiB fp32", [(1 << 16,)] * 64, f32),
        _scenario("S3", "gpt2-d128", "GPT-2 layout (148 tensors), d=128", gpt2, f32),
        _scenario("S3", "llama2-d128", "Llama-2 layout (291 tensors), d=128", llama, f32),
        _scenario("S3", "llama2-d128-fsdp8", "Llama-2 layout d=128, rank-0 shard of 8", fsdp_shard(llama, 8), f32),
        _scenario("S4", "mixed-1000", "1000 tensors: 60% <=4K, 40% 4K-32K", mixed_sizes(1000, 4096, 4096, 32768), f32),
        _scenario("S4", "10000x64", "10,000 tensors of 64", [(64,)] * 10_000, f32),
        _scenario("S4", "2000x1K", "2,000 tensors of 1K", [(1024,)] * 2000, f32),
        Scenario("S5", "mixed-dtypes-gpt2-d128", "GPT-2 layout d=128, fp32/fp16/bf16", tuple(gpt2), _mixed_dtypes(gpt2)),
    ]  # fmt: skip


def _quick() -> list[Scenario]:
    f32 = torch.float32
    gpt2 = gpt2_shapes(d=16, vocab=256, ctx=64)
    llama = llama_shapes(d=16, layers=32, vocab=256, ffn=44)
    return [
        _scenario("S1", "flat-64K", "one flat buffer, 64K fp32", [(1 << 16,)], f32),
        _scenario("S2", "buckets-16x16KB", "16 buckets of 16 KiB fp32", [(4096,)] * 16, f32),
        _scenario("S3", "gpt2-d16", "GPT-2 layout (148 tensors), d=16", gpt2, f32),
        _scenario("S3", "llama2-d16", "Llama-2 layout (291 tensors), d=16", llama, f32),
        _scenario("S3", "llama2-d16-fsdp8", "Llama-2 layout d=16, rank-0 shard of 8", fsdp_shard(llama, 8), f32),
        _scenario("S4", "mixed-1000", "1000 tensors: 60% <=1K, 40% 1K-4K", mixed_sizes(1000, 1024, 1024, 4096), f32),
        _scenario("S4", "200x1K", "200 tensors of 1K", [(1024,)] * 200, f32),
        Scenario("S5", "mixed-dtypes-gpt2-d16", "GPT-2 layout d=16, fp32/fp16/bf16", tuple(gpt2), _mixed_dtypes(gpt2)),
    ]  # fmt: skip


def scenarios(profile: str) -> list[Scenario]:
    """All kernel scenarios of a profile: "gpu" (PERF.md sizes), "cpu" or "quick"."""
    builders = {"gpu": _gpu, "cpu": _cpu, "quick": _quick}
    if profile not in builders:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return builders[profile]()


# ---------------------------------------------------------------------------- data


def allocate(scenario: Scenario, device: torch.device) -> list[torch.Tensor]:
    """Uninitialized tensors of the scenario's shapes and dtypes (fill them with :func:`fill_`)."""
    return [
        torch.empty(s, dtype=d, device=device) for s, d in zip(scenario.shapes, scenario.dtypes, strict=True)
    ]


def fill_(grads: list[torch.Tensor], variant: str, seed: int = 0) -> None:
    """Deterministic normal random values (the same for the same seed), then the variant's plant."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    gen = torch.Generator(device=grads[0].device).manual_seed(seed)
    with torch.no_grad():
        for g in grads:
            g.normal_(generator=gen)
        if variant == "inf@first":
            grads[0].view(-1)[0] = float("inf")
        elif variant == "nan@last":
            grads[-1].view(-1)[-1] = float("nan")


@dataclass(frozen=True)
class Reference:
    """float64 ground truth of a filled list: any non-finite element, and the 2-norm as stored."""

    found_inf: bool
    norm: float


def _norm64(g: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(g, 2.0, dtype=torch.float64))


def reference(grads: list[torch.Tensor]) -> Reference:
    """Computed one tensor at a time, the norm in float64 (synchronizes; never inside timing)."""
    with torch.no_grad():
        found = any(not bool(torch.isfinite(g).all()) for g in grads if g.numel())
        norm = float("nan") if found else norm64(grads)
    return Reference(found, norm)


def norm64(grads: list[torch.Tensor]) -> float:
    """The float64 2-norm of the current values (also checks what an implementation wrote)."""
    with torch.no_grad():
        return math.sqrt(sum(_norm64(g) ** 2 for g in grads if g.numel()))
