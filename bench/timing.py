"""Device and host time of a call, and the copy bandwidth of the device.

Each rep optionally restores its inputs, then flushes the caches by zeroing a buffer larger than
them (256 MiB on CUDA, as ``triton.testing.do_bench``; 64 MiB on CPU, twice this machine's L3).
CUDA: then synchronizes, records a CUDA event, calls, records a second event. Device time is the
time between the events; host time is ``time.perf_counter`` around the call alone, without
synchronizing (the time to enqueue, plus any host sync the call makes itself).
CPU: wall time of the call (there is no separate host time).
Reported: the median over the reps, the minimum, and the number of reps; reps stop early once
``budget_s`` of timed calls have run (at least ``min_reps``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import traffic

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
        "gbs": traffic.copy_gbs(nbytes, timing.device_ms),
        "reps": timing.reps,
    }
