"""Count host reads of tensors (the Python-level ways a tensor's value reaches the host)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch

SYNC_METHODS = ("item", "__bool__", "tolist", "__float__", "__int__")


@contextlib.contextmanager
def count_host_syncs(methods: tuple[str, ...] = SYNC_METHODS) -> Iterator[Counter[str]]:
    """Count calls of the ``Tensor`` ``methods`` (default ``item/__bool__/tolist/__float__/__int__``)
    inside the block, by name. Also used by ``bench/`` (which adds ``cpu``)."""
    counts: Counter[str] = Counter()
    saved = {name: torch.Tensor.__dict__.get(name) for name in methods}

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
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
