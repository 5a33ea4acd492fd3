"""Helpers for tests and benchmarks of distributed scaling: real ranks, host reads, collectives.

* :func:`run_ranks` runs a function on N real gloo ranks (``spawn``, never ``fork``, which can
  deadlock once the parent ran a multi-threaded op) with a timeout, and returns each rank's result.
  Each rank pays ~1 s of ``import torch``: group many checks into one job.
* :func:`count_host_syncs` counts the Python-level ways a tensor's value reaches the host
  (``Tensor.item/__bool__/tolist/__float__/__int__``): on a GPU each is a sync, and on a CPU it is
  the same code path, so CPU tests can assert the GPU's sync count. :func:`count_syncs` uses
  ``torch.cuda.set_sync_debug_mode`` on CUDA instead.
* :func:`count_collectives` counts the backend's collectives (``gloo:*``/``nccl:*`` profiler
  events), which also sees the functional collectives of DTensor and FSDP2.

Imported by ``tests/`` and ``bench/`` only; nothing in the library imports it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["SYNC_METHODS", "count_collectives", "count_host_syncs", "count_syncs", "run_ranks"]

SYNC_METHODS = ("item", "__bool__", "tolist", "__float__", "__int__")


# ---------------------------------------------------------------------------- ranks


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: Any
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size
        )
        result = ("ok", fn(rank, world_size, *args))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # report to the parent instead of dying silently
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(f"{workdir}/result-{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    # Leave without running C++ static destructors: a background thread of torch's profiler or
    # gloo torn down at interpreter exit occasionally aborts ("terminate called without an
    # active exception") after the job has finished and its result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results by rank.

    ``fn`` must be importable by the children (a module-level function). Raises AssertionError
    with every failing rank's traceback, or TimeoutError (the ranks are killed).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="distscale-") as workdir:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, workdir, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks exceeded {timeout:.0f} s")
        results = []
        for rank in range(world_size):
            with open(f"{workdir}/result-{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


# ---------------------------------------------------------------------------- host reads


@contextlib.contextmanager
def count_host_syncs(methods: tuple[str, ...] = SYNC_METHODS) -> Iterator[Counter[str]]:
    """Count calls of the ``Tensor`` ``methods`` inside the block, by name (filled as they happen)."""
    counts: Counter[str] = Counter()
    saved = {name: torch.Tensor.__dict__.get(name) for name in methods}

    def wrap(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in methods:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[Counter[str]]:
    """Host syncs by kind, filled when the block exits: on CUDA what ``set_sync_debug_mode``
    reports; elsewhere the host reads of :func:`count_host_syncs` plus ``Tensor.cpu``."""
    counts: Counter[str] = Counter()
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        counts["cuda_sync"] += sum(1 for w in caught if "synchroniz" in str(w.message))
        return
    with count_host_syncs((*SYNC_METHODS, "cpu")) as reads:
        yield counts
    counts.update(reads)


# ---------------------------------------------------------------------------- collectives


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Backend collectives issued in the block (profiler events), by name; filled on exit."""
    counts: Counter[str] = Counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield counts
    for event in prof.events():
        if event.name.startswith(("gloo:", "nccl:")):
            counts[event.name] += 1
