"""Run a function on N real gloo ranks (spawn, never fork), with a timeout; collect each rank's result.

Each rank costs ~1 s of ``import torch``: group many checks into one job.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    import torch
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

    Raises AssertionError with every failing rank's traceback, or TimeoutError (ranks killed).
    """
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
