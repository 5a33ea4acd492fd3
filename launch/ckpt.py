"""Atomic, verified checkpoints of the main job through ``torch.distributed.checkpoint``.

Layout: ``<dir>/step_00000040/`` holds DCP's shard files and ``.metadata``, plus ``manifest.json``
(sha256 and size of every file, the step, the run settings). A checkpoint is written into
``<dir>/.tmp-step_00000040-<id>/``; only when every rank has written its shards does rank 0 hash
the files, write the manifest, and rename the directory into place, so a crash mid-save leaves the
previous checkpoint as the latest complete one. Loading verifies the manifest before DCP reads a
byte: a truncated or corrupted file fails with the file's name and the checkpoint to fall back to.

Sharded state (FSDP2/HSDP/FSDP1) is saved per shard and can be loaded on a different number of
ranks (DCP reshards); DDP state is saved once (DCP de-duplicates replicas).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (temporary directories ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())


def save(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Save ``state`` (DCP-compatible, Stateful values allowed) as checkpoint ``step``.

    Collective: every rank calls it. Returns the final directory.
    """
    rank = dist.get_rank()
    token = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    tmp = root / f".tmp-step_{step:08d}-{token[0]}"
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shard is on disk
    final = _step_dir(root, step)
    if rank == 0:
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"step": step, "meta": meta, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a previous attempt saved this step: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic on one file system
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def verify(path: Path) -> dict[str, Any]:
    """Check every file of checkpoint ``path`` against its manifest; return the manifest."""
    previous = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
    fallback = (
        f" The previous checkpoint {previous[-1]} is intact: resume from it with --resume {previous[-1]}."
        if previous
        else ""
    )
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}).{fallback}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}).{fallback}") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}.{fallback}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is truncated: {name} has {size} bytes, expected {expected['bytes']}.{fallback}"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its sha256 check.{fallback}")
    return manifest


def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Verify then load checkpoint ``path`` into ``state`` in place; return its manifest.

    Collective. Every rank verifies the same files, so every rank raises the same error.
    """
    manifest = verify(path)
    dcp.load(state, checkpoint_id=str(path))
    return manifest


def resolve(resume: str, root: Path | None) -> Path | None:
    """``--resume`` value to a checkpoint directory: "auto" = latest complete one under ``root``
    (None if there is none yet), otherwise the given path."""
    if resume == "auto":
        if root is None:
            raise CheckpointError("--resume auto needs --ckpt-dir.")
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory.")
    return path
