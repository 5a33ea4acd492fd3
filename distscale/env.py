"""Launch environments as pure functions of an environment mapping, and ``init_distributed()``.

``detect_env(environ)`` recognises, in this order:

* torchrun / torchelastic: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (+ ``MASTER_ADDR``/``MASTER_PORT``);
* Slurm tasks started by ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` inside a job
  step (``SLURM_STEP_ID``); the head node is the first host of ``SLURM_STEP_NODELIST`` /
  ``SLURM_JOB_NODELIST`` (every compressed form: ``gpu[01-04,07],cpu-a1``) and the port is derived
  from the job id unless ``MASTER_PORT`` is set;
* Open MPI (``OMPI_COMM_WORLD_*``), MPICH / Intel MPI / PMI (``PMI_RANK``, ``PMI_SIZE``,
  ``MPI_LOCALRANKID``);
* otherwise a single process.

Nothing here reads ``os.environ`` except ``init_distributed``; errors name the variables at fault
and say how to fix the launch.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["DistEnv", "LaunchError", "detect_env", "expand_nodelist", "init_distributed"]


class LaunchError(RuntimeError):
    """The launch environment is missing variables or contradicts itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DistEnv:
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None  # None: agree on one at init (MPI) or not needed (single)
    master_port: int | None = None


# ---------------------------------------------------------------------------- Slurm node lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in Slurm node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise LaunchError(f"bad range {item!r} in Slurm node list {nodelist!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise LaunchError(f"descending range {item!r} in Slurm node list {nodelist!r}")
        width = len(low)  # zero padding is kept: gpu[01-03] -> gpu01, gpu02, gpu03
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (``gpu[01-04,07],cpu-a1``, ``n[1-2]-ib[3,5]``) into host names."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)  # alternate literal / bracket pieces
        expanded = [""]
        for piece in pieces:
            if piece.startswith("["):
                options = _expand_range(piece[1:-1], nodelist)
                expanded = [prefix + option for prefix in expanded for option in options]
            elif piece:
                expanded = [prefix + piece for prefix in expanded]
        hosts.extend(expanded)
    if not hosts:
        raise LaunchError(f"empty Slurm node list {nodelist!r}")
    return hosts


# ---------------------------------------------------------------------------- detection


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LaunchError(f"{name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {value!r}") from None


def _first_int(environ: Mapping[str, str], names: tuple[str, ...], hint: str) -> int:
    for name in names:
        if name in environ:
            return _int(environ, name)
    raise LaunchError(f"none of {', '.join(names)} is set. HINT: {hint}")


def _checked(launcher: str, rank: int, world: int, local_rank: int, names: str, **extra) -> DistEnv:
    if world < 1:
        raise LaunchError(f"{launcher}: world size must be >= 1, got {world} ({names})")
    if not 0 <= rank < world:
        raise LaunchError(f"{launcher}: rank must be in [0, {world}), got {rank} ({names})")
    if not 0 <= local_rank < world:
        raise LaunchError(f"{launcher}: local rank must be in [0, {world}), got {local_rank} ({names})")
    return DistEnv(launcher=launcher, rank=rank, world_size=world, local_rank=local_rank, **extra)


def _port(environ: Mapping[str, str], default: int | None) -> int | None:
    if "MASTER_PORT" not in environ:
        return default
    port = _int(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT must be in (0, 65536), got {port}")
    return port


def _torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [
        n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in environ
    ]
    if missing:
        raise LaunchError(
            f"torchrun-style launch is missing {', '.join(missing)}. "
            "HINT: start with torchrun, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."
        )
    return _checked(
        "torchrun",
        _int(environ, "RANK"),
        _int(environ, "WORLD_SIZE"),
        _int(environ, "LOCAL_RANK"),
        "RANK, WORLD_SIZE, LOCAL_RANK",
        master_addr=environ["MASTER_ADDR"],
        master_port=_port(environ, None),
    )


def _slurm(environ: Mapping[str, str]) -> DistEnv:
    hint = "launch the tasks with srun inside the allocation (srun python launch/train.py)."
    rank = _first_int(environ, ("SLURM_PROCID",), hint)
    world = _first_int(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), hint)
    local_rank = _first_int(environ, ("SLURM_LOCALID",), hint)
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    if not environ.get("MASTER_ADDR") and not nodelist:
        raise LaunchError(
            f"Slurm: neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is set. HINT: {hint}"
        )
    addr = environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]  # type: ignore[arg-type]
    job_id = environ.get("SLURM_JOB_ID", "0")
    # Same port on every task of the job, different jobs on one node rarely collide.
    default_port = 15000 + int(job_id) % 20000 if job_id.isdigit() else 15000
    return _checked(
        "slurm",
        rank,
        world,
        local_rank,
        "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID",
        master_addr=addr,
        master_port=_port(environ, default_port),
    )


def _mpi(environ: Mapping[str, str]) -> DistEnv:
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
        hint = "start the job with mpirun (Open MPI sets all three)."
    else:
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")
        hint = (
            "start the job with mpiexec/mpirun (MPICH and Intel MPI set PMI_RANK, PMI_SIZE, MPI_LOCALRANKID)."
        )
    missing = [n for n in names if n not in environ]
    if missing:
        raise LaunchError(f"MPI launch is missing {', '.join(missing)}. HINT: {hint}")
    rank, world, local_rank = (_int(environ, n) for n in names)
    return _checked(
        "mpi",
        rank,
        world,
        local_rank,
        ", ".join(names),
        master_addr=environ.get("MASTER_ADDR") or None,
        master_port=_port(environ, None),
    )


def detect_env(environ: Mapping[str, str]) -> DistEnv:
    """Return the launch environment described by ``environ`` (pure: no I/O).

    Raises:
        LaunchError: the variables of a launcher are present but incomplete or inconsistent.
    """
    if "TORCHELASTIC_RUN_ID" in environ or any(n in environ for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return _torchrun(environ)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _slurm(environ)
    if any(n in environ for n in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")):
        return _mpi(environ)
    return DistEnv(launcher="single", rank=0, world_size=1, local_rank=0)


# ---------------------------------------------------------------------------- initialisation


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(env: DistEnv) -> tuple[str, int]:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them (the MPI extra)."""
    import sys

    ours = "mpi4py.MPI" not in sys.modules  # importing it initialises MPI
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError(
            "MPI launch without MASTER_ADDR needs mpi4py to agree on an address. "
            "HINT: pip install 'distscale[mpi]', or pass -x MASTER_ADDR=<host> -x MASTER_PORT=<port> to mpirun."
        ) from exc
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise LaunchError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}, the environment says "
            f"{env.rank} of {env.world_size}: mpi4py was built against another MPI than mpirun's."
        )
    payload = (
        (socket.gethostbyname(socket.gethostname()), env.master_port or _free_port())
        if env.rank == 0
        else None
    )
    addr, port = comm.bcast(payload, root=0)
    if ours:
        # MPI was only needed to agree on the address: finalize now, with every rank at the same
        # point and before torch starts its threads (a Finalize at exit hangs now and then).
        MPI.Finalize()
    return addr, port


def init_distributed(
    environ: Mapping[str, str] | None = None,
    *,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> DistEnv:
    """Initialise ``torch.distributed`` for whatever launched this process; return the DistEnv.

    NCCL when CUDA is available (binding ``cuda:local_rank``), gloo otherwise. A single process
    gets a one-rank group on a free loopback port, so FSDP/DTensor code runs unchanged.
    Collective: every rank of the launch must call it.
    """
    import torch
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    env = detect_env(environ)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    addr, port = env.master_addr, env.master_port
    if env.launcher == "single":
        addr, port = "127.0.0.1", _free_port()
    elif env.launcher == "mpi" and (addr is None or port is None):
        addr, port = _mpi_rendezvous(env)
    if env.launcher == "torchrun" and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchelastic's agent hosts the store and keeps it across worker restarts, without a
        # per-attempt prefix: a restarted rank could read its peer's gloo address from the
        # failed attempt and hang or be refused. Namespace the keys by attempt.
        attempt = environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
        assert env.master_addr is not None and env.master_port is not None  # torchrun always sets both
        agent_store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"/distscale/attempt_{attempt}/", agent_store)
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    elif env.launcher == "torchrun":
        dist.init_process_group(backend, timeout=timeout)  # env://
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    return env
