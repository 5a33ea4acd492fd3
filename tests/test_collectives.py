"""The step's single collective (distscale.collectives): packing and unpacking, identity on one
process, and one all-reduce (or one all-gather when inf-norms meet sums) on real gloo ranks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from distscale.collectives import Contribution, ReduceGroup
from distscale.testing import count_collectives, run_ranks

INF, NAN = float("inf"), float("nan")


def test_one_process_is_the_identity_with_no_power_round_trip() -> None:
    norm = torch.tensor(3.0000002)  # a power round trip would round it
    nan_norm = torch.tensor(NAN)
    out = ReduceGroup().reduce(
        Contribution(
            flags=[torch.tensor(0.0), torch.tensor(2.0)],
            norms=[(norm, 2.0), (nan_norm, INF)],
            sums=[torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)],
            slots=torch.tensor([5.0, 6.0]),
        )
    )
    assert [f.item() for f in out.flags] == [0.0, 1.0] and all(f.dim() == 0 for f in out.flags)
    assert torch.equal(out.norms[0], norm) and math.isnan(out.norms[1].item())  # NaN stays NaN
    assert out.sums[0].tolist() == [1.0, 2.0, 3.0] and out.sums[0].dtype == torch.float32
    assert out.slots is not None and out.slots.tolist() == [[5.0, 6.0]]
    assert ReduceGroup().reduce(Contribution()).flags == []


def _job(rank: int, world: int) -> dict[str, Any]:
    group = ReduceGroup()
    out: dict[str, Any] = {}
    cases = {
        # finite norms and sums: one SUM all-reduce
        "sum": Contribution(
            flags=[torch.tensor(float(rank == 1)), torch.tensor(0.0)],
            norms=[(torch.tensor(3.0 + rank), 2.0), (torch.tensor(1.0), 1.0)],
            sums=[torch.tensor([rank, 1.0, 10.0])],
        ),
        # inf-norms only: one MAX all-reduce; inf and NaN on a rank come back inf, not float max
        "max": Contribution(
            flags=[torch.tensor(float(rank == 0))],
            norms=[
                (torch.tensor(INF if rank == 1 else 2.0), INF),
                (torch.tensor(NAN if rank == 1 else 1.0), INF),
            ],
            slots=torch.tensor([float(rank), 7.0]),
        ),
        # inf-norm with a finite one and sums: MAX would break the sums, so one all-gather
        "mixed": Contribution(
            flags=[torch.tensor(0.0)],
            norms=[(torch.tensor(2.0 * (rank + 1)), INF), (torch.tensor(4.0), 2.0)],
            sums=[torch.tensor([1.0, 2.0])],
        ),
    }
    for name, contribution in cases.items():
        with count_collectives() as counts:
            reduced = group.reduce(contribution)
        out[name] = {
            "collectives": dict(counts),
            "flags": [f.item() for f in reduced.flags],
            "norms": [n.item() for n in reduced.norms],
            "sums": [s.tolist() for s in reduced.sums],
            "slots": None if reduced.slots is None else reduced.slots.tolist(),
        }
    return out


@pytest.mark.slow
def test_two_ranks_one_collective_exact_values() -> None:
    results = run_ranks(_job, 2)
    assert results[0] == results[1]
    out = results[0]
    assert out["sum"]["flags"] == [1.0, 0.0]
    assert out["sum"]["norms"] == pytest.approx([5.0, 2.0])  # sqrt(3^2 + 4^2); 1 + 1
    assert out["sum"]["sums"] == [[1.0, 2.0, 20.0]]
    assert out["max"]["flags"] == [1.0] and out["max"]["norms"] == [INF, INF]
    assert out["max"]["slots"] == [[0.0, 7.0], [1.0, 7.0]]
    assert out["mixed"]["norms"] == pytest.approx([4.0, math.sqrt(32.0)]) and out["mixed"]["sums"] == [
        [2.0, 4.0]
    ]
    assert [sum(o["collectives"].values()) for o in out.values()] == [1, 1, 1]
    assert any("all_reduce" in k for k in out["sum"]["collectives"])
    assert any("gather" in k for k in out["mixed"]["collectives"])
