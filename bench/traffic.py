"""Bytes moved per scaler check (PERF.md's model), GB/s, % of copy bandwidth and the floor.

S = bytes of the gradients as stored, P = elements. PERF.md's modes: read-only check + norm 4P
(S), in-place check + unscale (+ norm) 8P (2S), torch's ``unscale_`` + ``clip_grad_norm_`` chain
20P (5S: R+W, R, R+W), torch's fused-optimizer check 8P (2S: it writes even with inv_scale=1).
The Megatron and DeepSpeed re-implementations are modelled pass by pass the same way; they skip
their norm and clip passes when the list overflows. GB = 1e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sizes:
    """S (``nbytes``), P (``elements``) and the elements not already float32 (``converted``)."""

    nbytes: int
    elements: int
    converted: int = 0

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Sizes:
        return cls(
            nbytes=sum(t.numel() * t.element_size() for t in tensors),
            elements=sum(t.numel() for t in tensors),
            converted=sum(t.numel() for t in tensors if t.dtype != torch.float32),
        )


def read_only(s: Sizes, overflow: bool = False) -> int:
    """Check + norm in one read pass (unscale folded into the optimizer): 4P for fp32."""
    return s.nbytes


def in_place(s: Sizes, overflow: bool = False) -> int:
    """Check + unscale (+ norm) in one read+write pass: 8P for fp32."""
    return 2 * s.nbytes


def torch_chain(s: Sizes, overflow: bool = False) -> int:
    """``unscale_`` (R+W) + ``clip_grad_norm_``: norm (R) and the always-applied mul (R+W): 20P."""
    return 5 * s.nbytes


def fused_check(s: Sizes, overflow: bool = False) -> int:
    """torch's fused-optimizer check: the unscale kernel with inv_scale=1, still R+W: 8P."""
    return 2 * s.nbytes


def megatron(s: Sizes, overflow: bool = False) -> int:
    """Unscale (R+W); unless overflow: multi-tensor norm (R) and clip scale (R+W)."""
    return 2 * s.nbytes if overflow else 5 * s.nbytes


def _deepspeed_rest(s: Sizes, overflow: bool) -> int:
    # Unless overflow: fp64 norm per tensor (read, write an fp64 copy, read it) + unscale×clip (R+W).
    return 0 if overflow else s.nbytes + 16 * s.elements + 2 * s.nbytes


def deepspeed(s: Sizes, overflow: bool = False) -> int:
    """DeepSpeed 0.19 ZeRO-1/2: amax + amin per tensor (2 reads), then fp64 norm and clip."""
    return 2 * s.nbytes + _deepspeed_rest(s, overflow)


def deepspeed_legacy(s: Sizes, overflow: bool = False) -> int:
    """DeepSpeed before PR #8325: x.float() (a copy unless fp32), isnan, isinf, logical_or,
    .float(), max on fp32 temporaries (22 bytes per element), then fp64 norm and clip."""
    # Reading the non-fp32 tensors (S minus the fp32 ones) and writing their fp32 copies.
    convert = (s.nbytes - 4 * (s.elements - s.converted)) + 4 * s.converted
    return convert + 22 * s.elements + _deepspeed_rest(s, overflow)


def gbs(nbytes: float, ms: float) -> float:
    """Effective bandwidth in GB/s of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / ms / 1e6


def floor_ms(nbytes: float, copy_gbs: float) -> float:
    """The memory-bound floor: time to move ``nbytes`` at the measured copy bandwidth."""
    return nbytes / copy_gbs / 1e6


def pct_of(value_gbs: float, copy_gbs: float) -> float:
    """``value_gbs`` as a percentage of the measured copy bandwidth."""
    return 100.0 * value_gbs / copy_gbs


def copy_gbs(copied_bytes: int, ms: float) -> float:
    """Copy bandwidth counting read + write: a copy of N bytes moves 2N."""
    return gbs(2 * copied_bytes, ms)
