"""Measuring a call: device and host time, bytes moved, copy bandwidth, scratch memory.

**Time.** Each rep optionally restores its inputs, then flushes the caches by zeroing a buffer larger than
them (256 MiB on CUDA, as ``triton.testing.do_bench``; 64 MiB on CPU, twice this machine's L3).
CUDA: then synchronizes, records a CUDA event, calls, records a second event. Device time is the
time between the events; host time is ``time.perf_counter`` around the call alone, without
synchronizing (the time to enqueue, plus any host sync the call makes itself).
CPU: wall time of the call (there is no separate host time).
Reported: the median over the reps, the minimum, and the number of reps; reps stop early once
``budget_s`` of timed calls have run (at least ``min_reps``).

**Bytes** per scaler check (bench/PERF.md's model), GB/s, % of copy bandwidth and the floor. S = bytes of the gradients as stored, P = elements. PERF.md's modes: read-only check + norm 4P
(S), in-place check + unscale (+ norm) 8P (2S), torch's ``unscale_`` + ``clip_grad_norm_`` chain
20P (5S: R+W, R, R+W), torch's fused-optimizer check 8P (2S: it writes even with inv_scale=1).
The Megatron and DeepSpeed re-implementations are modelled pass by pass the same way; they skip
their norm and clip passes when the list overflows. GB = 1e9 bytes.

**Scratch memory**: the peak of CUDA allocated memory above what was allocated on entry.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------- timing

FLUSH_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


@dataclass(frozen=True)
class Timing:
    device_ms: float
    device_ms_min: float
    host_ms: float | None
    reps: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than the device's last-level cache, to zero before each rep."""
    return torch.empty(FLUSH_BYTES.get(device.type, 256 << 20), dtype=torch.int8, device=device)


def time_call(
    call: Callable[[int], object],
    device: torch.device,
    *,
    reps: int,
    warmup: int = 1,
    before_each: Callable[[], None] | None = None,
    flush: torch.Tensor | None = None,
    budget_s: float = float("inf"),
    min_reps: int = 3,
) -> Timing:
    """Time ``call(i)`` (``i`` counts every call, warm-up included) ``reps`` times."""
    i = 0
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        call(i)
        i += 1
    synchronize(device)
    device_ms: list[float] = []
    host_ms: list[float] = []
    spent = 0.0
    for _ in range(reps):
        if before_each is not None:
            before_each()
        if flush is not None:
            flush.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            call(i)
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
            host_ms.append((t1 - t0) * 1e3)
        else:
            t0 = time.perf_counter()
            call(i)
            t1 = time.perf_counter()
            device_ms.append((t1 - t0) * 1e3)
        i += 1
        spent += device_ms[-1] / 1e3
        if spent > budget_s and len(device_ms) >= min_reps:
            break
    return Timing(
        device_ms=statistics.median(device_ms),
        device_ms_min=min(device_ms),
        host_ms=statistics.median(host_ms) if host_ms else None,
        reps=len(device_ms),
    )


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> dict[str, float]:
    """Median bandwidth of a device-to-device copy of ``nbytes`` (read + write counted: 2·nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(1, 255)  # never zeros
    dst = torch.empty_like(src)
    timing = time_call(lambda _: dst.copy_(src), device, reps=reps, warmup=2, flush=flush_buffer(device))
    return {
        "bytes_copied": nbytes,
        "ms": timing.device_ms,
        "gbs": copy_gbs(nbytes, timing.device_ms),
        "reps": timing.reps,
    }


# ---------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Sizes:
    """S (``nbytes``), P (``elements``) and the elements not already float32 (``converted``)."""

    nbytes: int
    elements: int
    converted: int = 0

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Sizes:
        return cls(
            nbytes=sum(t.numel() * t.element_size() for t in tensors),
            elements=sum(t.numel() for t in tensors),
            converted=sum(t.numel() for t in tensors if t.dtype != torch.float32),
        )


def read_only(s: Sizes, overflow: bool = False) -> int:
    """Check + norm in one read pass (unscale folded into the optimizer): 4P for fp32."""
    return s.nbytes


def in_place(s: Sizes, overflow: bool = False) -> int:
    """Check + unscale (+ norm) in one read+write pass: 8P for fp32."""
    return 2 * s.nbytes


def torch_chain(s: Sizes, overflow: bool = False) -> int:
    """``unscale_`` (R+W) + ``clip_grad_norm_``: norm (R) and the always-applied mul (R+W): 20P."""
    return 5 * s.nbytes


def fused_check(s: Sizes, overflow: bool = False) -> int:
    """torch's fused-optimizer check: the unscale kernel with inv_scale=1, still R+W: 8P."""
    return 2 * s.nbytes


def megatron(s: Sizes, overflow: bool = False) -> int:
    """Unscale (R+W); unless overflow: multi-tensor norm (R) and clip scale (R+W)."""
    return 2 * s.nbytes if overflow else 5 * s.nbytes


def _deepspeed_rest(s: Sizes, overflow: bool) -> int:
    # Unless overflow: fp64 norm per tensor (read, write an fp64 copy, read it) + unscale×clip (R+W).
    return 0 if overflow else s.nbytes + 16 * s.elements + 2 * s.nbytes


def deepspeed(s: Sizes, overflow: bool = False) -> int:
    """DeepSpeed 0.19 ZeRO-1/2: amax + amin per tensor (2 reads), then fp64 norm and clip."""
    return 2 * s.nbytes + _deepspeed_rest(s, overflow)


def deepspeed_legacy(s: Sizes, overflow: bool = False) -> int:
    """DeepSpeed before PR #8325: x.float() (a copy unless fp32), isnan, isinf, logical_or,
    .float(), max on fp32 temporaries (22 bytes per element), then fp64 norm and clip."""
    # Reading the non-fp32 tensors (S minus the fp32 ones) and writing their fp32 copies.
    convert = (s.nbytes - 4 * (s.elements - s.converted)) + 4 * s.converted
    return convert + 22 * s.elements + _deepspeed_rest(s, overflow)


def gbs(nbytes: float, ms: float) -> float:
    """Effective bandwidth in GB/s of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / ms / 1e6


def floor_ms(nbytes: float, copy_gbs: float) -> float:
    """The memory-bound floor: time to move ``nbytes`` at the measured copy bandwidth."""
    return nbytes / copy_gbs / 1e6


def pct_of(value_gbs: float, copy_gbs: float) -> float:
    """``value_gbs`` as a percentage of the measured copy bandwidth."""
    return 100.0 * value_gbs / copy_gbs


def copy_gbs(copied_bytes: int, ms: float) -> float:
    """Copy bandwidth counting read + write: a copy of N bytes moves 2N."""
    return gbs(2 * copied_bytes, ms)


# ---------------------------------------------------------------------------- scratch memory


@contextlib.contextmanager
def scratch_bytes(device: torch.device) -> Iterator[dict[str, int | None]]:
    """``{"bytes": peak allocated above the entry level}`` on CUDA, ``None`` elsewhere."""
    out: dict[str, int | None] = {"bytes": None}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    torch.cuda.synchronize(device)
    out["bytes"] = max(0, torch.cuda.max_memory_allocated(device) - base)
