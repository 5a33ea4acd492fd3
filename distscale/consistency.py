"""The opt-in divergence check: each rank's scale state rides in the step's collective.

``fingerprint`` is what a rank contributes (exact in float64); ``verify`` reads the gathered
table once (a host sync, on check steps only) and raises the same error on every rank, so no
rank proceeds to a collective the others will not join.
"""

from __future__ import annotations

import torch

from distscale.errors import InconsistentStateError
from distscale.policy import ScaleState

FIELDS = ("scale", "growth_tracker", "hysteresis_tracker", "num_updates")


def fingerprint(state: ScaleState) -> torch.Tensor:
    return torch.stack([getattr(state, name).double() for name in FIELDS])


def verify(table: torch.Tensor) -> None:
    """Raise ``InconsistentStateError`` naming the ranks whose row differs from the majority's.

    ``table``: (world_size, len(FIELDS)), identical on every rank. Host sync.
    """
    rows = [tuple(row) for row in table.tolist()]
    if len(set(rows)) == 1:
        return
    # Majority row; ties go to the row of the lowest rank.
    majority = max(set(rows), key=lambda r: (rows.count(r), -rows.index(r)))
    bad = [rank for rank, row in enumerate(rows) if row != majority]
    detail = "; ".join(f"rank {r}: {dict(zip(FIELDS, rows[r], strict=True))}" for r in bad)
    raise InconsistentStateError(
        f"GradScaler state differs across ranks {bad} (majority: {dict(zip(FIELDS, majority, strict=True))}); "
        f"{detail}. Ranks must run the same scaler calls and load the same checkpoint."
    )
