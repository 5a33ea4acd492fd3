"""The underflow monitor: how many gradient elements the current scale leaves at or near zero.

A scale that is too low shows up as gradients that are exactly zero, or so small that fp16 would
flush them: a scaled value of magnitude <= 2**-25 rounds to zero in float16. On monitor steps
(opt-in, every ``underflow_every`` updates) the scaler counts, over the *scaled* gradients before
they are unscaled, the elements that are zero and those that are nonzero but would flush, and
adds the counts to the step's single collective, so the fractions are job-wide with no extra
collective and no host sync. Only owned elements count (FSDP padding and replicas once), as for
the norm (see :mod:`distscale.sharding`).

Cost: one extra read of the gradients on monitor steps; nothing on other steps.
For fp16 gradients the "would flush" count is always zero (they are already fp16: what
underflowed is in the zero count); it is meaningful for fp32/bf16 gradients of autocast training.
"""

from __future__ import annotations

import torch

from distscale.stats import FP16_FLUSH

__all__ = ["count", "fractions"]


def count(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(zeros, would_flush, total) over ``tensors`` as a float64 (3,) tensor on ``device``.

    Exact locally; the collective carries them as float32, so the job-wide fractions are good
    to about 1e-7. No host sync.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0:
                continue
            zeros = (t == 0).sum()
            flush = ((t.abs() <= FP16_FLUSH) & (t != 0)).sum()
            part = torch.stack([zeros, flush, torch.full_like(zeros, t.numel())]).to(device, torch.float64)
            totals += part
    return totals


def fractions(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero_fraction, underflow_fraction) from reduced counts; NaN when nothing was counted."""
    total = counts[2]
    return counts[0] / total, counts[1] / total
