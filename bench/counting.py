"""Counting host syncs, collectives and scratch memory of a block of code.

Host syncs: on CUDA, the synchronizing operations reported by ``torch.cuda.set_sync_debug_mode``;
on CPU (where nothing really synchronizes), the Python-level host reads of tensor values that
would be syncs on a GPU: ``Tensor.item/tolist/__bool__/__float__/__int__/cpu``.
Collectives: the backend's profiler events (``gloo:*``/``nccl:*``), which also catch the functional
collectives (DTensor, FSDP2) that bypass ``torch.distributed.all_reduce``.
Scratch memory: the peak of CUDA allocated memory above what was allocated on entry.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator

import torch

from tests._syncs import count_host_syncs

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


@contextlib.contextmanager
def _cuda_syncs(counts: Counter[str]) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counts["cuda_sync"] += sum(1 for w in caught if "synchroniz" in str(w.message))


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[Counter[str]]:
    """Counts by kind, filled when the block exits; ``sum(counts.values())`` is the total."""
    counts: Counter[str] = Counter()
    if device.type == "cuda":
        with _cuda_syncs(counts):
            yield counts
        return
    with count_host_syncs(HOST_READS) as reads:
        yield counts
    counts.update(reads)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Backend collectives issued in the block (profiler events), by name."""
    counts: Counter[str] = Counter()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        yield counts
    for event in prof.events():
        if event.name.startswith(("gloo:", "nccl:")):
            counts[event.name] += 1


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
