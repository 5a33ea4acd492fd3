"""Replay the scaling rules over synthetic gradient-magnitude traces: pure policy, CPU, seconds.

    python -m bench.amax_replay [--steps 100000] [--seeds 8] [--out results.md]

A trace gives, per step, the largest unscaled parameter-gradient magnitude ``m`` (log2: a slow
drift, heavy-tailed noise, rare spikes) and the ratio ``r`` by which the largest activation
gradient of the backward pass exceeds it (where fp16 overflows first). At scale ``s`` the step
overflows when ``m x r x s > 65504``; otherwise the scaler sees ``amax = m x s``. Gradient
elements are log-normal below ``m`` (log2 spread ``SPREAD``); the underflow fraction is the share
that ``s`` leaves at or below 2^-25 (where fp16 flushes to zero). Every rule runs through
``distscale.policy.update`` on all traces and seeds at once (its state tensors are 1-D here), so
the replay is the rule itself, not a model of it.

Rules: torch's (growth_interval 2000), the DeepSpeed, Megatron and fairseq presets (their
defaults, window 2000 where they have one), and "amax" (interval 2000) at its default margin 8
and at 16 and 4: the margin trades skipped steps for scale (underflow).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from distscale import policy, presets
from distscale.config import FP16_MAX, ScalerConfig

SPREAD = 6.0  # log2 standard deviation of the elements below the largest one
MEDIAN_BELOW_MAX = 10.0  # log2: the median element is 2^-10 of the largest
TRACES = ("steady", "decaying", "spiky", "heavy-tailed")


def _config(settings: dict) -> ScalerConfig:
    # A preset's GradScaler arguments, less the ones that are not the rule's (enabled, ...).
    return ScalerConfig(**{k: v for k, v in settings.items() if k in ScalerConfig.__dataclass_fields__})


def rules() -> dict[str, ScalerConfig]:
    torch_rule = ScalerConfig(init_scale=2.0**16, growth_interval=2000)
    return {
        "torch": torch_rule,
        "deepspeed": _config(
            presets.deepspeed({"fp16": {"initial_scale_power": 16, "loss_scale_window": 2000}})
        ),
        "megatron": _config(presets.megatron(initial_loss_scale=2.0**16, loss_scale_window=2000)),
        "fairseq": _config(presets.fairseq(init_scale=2.0**16, scale_window=2000)),
        **{f"amax (margin {m:g})": replace(torch_rule, rule="amax", amax_margin=m) for m in (8.0, 16.0, 4.0)},
    }


def trace(name: str, steps: int, seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2 m, log2 r), each (steps, seeds) float64."""
    gen = torch.Generator().manual_seed(TRACES.index(name))
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    drift = {
        "steady": -6.0 + torch.sin(t / steps * 2 * math.pi),
        "decaying": -2.0 - 10.0 * t / steps,  # gradients shrink 1000x over training
        "spiky": -6.0 + 0 * t,
        "heavy-tailed": -6.0 + torch.sin(t / steps * 6 * math.pi),
    }[name]
    if name == "heavy-tailed":  # Student-t noise, 3 degrees of freedom
        normal = torch.randn(steps, seeds, generator=gen, dtype=torch.float64)
        squares = (torch.randn(steps, seeds, generator=gen, dtype=torch.float64) ** 2 for _ in range(3))
        chi2 = sum(squares, torch.zeros((), dtype=torch.float64))
        noise = 0.7 * normal / torch.sqrt(chi2 / 3)
    else:
        noise = 0.5 * torch.randn(steps, seeds, generator=gen, dtype=torch.float64)
    spike_rate = 1e-3 if name == "spiky" else 1e-4
    spikes = (torch.rand(steps, seeds, generator=gen, dtype=torch.float64) < spike_rate) * 8.0
    log_m = drift + noise + spikes
    log_r = 1.0 + 2.0 * torch.rand(steps, seeds, generator=gen, dtype=torch.float64)  # 2x-8x
    return log_m, log_r


def replay(config: ScalerConfig, log_m: torch.Tensor, log_r: torch.Tensor) -> dict[str, float]:
    steps, seeds = log_m.shape
    state = policy.ScaleState(*(t.expand(seeds).clone() for t in policy.init_state(config)))
    log_scales = torch.empty(steps, seeds, dtype=torch.float64)
    overflow_at = math.log2(FP16_MAX)
    amax_rule = config.rule == "amax"
    for i in range(steps):
        log_s = torch.log2(state.scale.double())
        log_scales[i] = log_s
        found = (log_m[i] + log_r[i] + log_s) > overflow_at
        amax = torch.where(found, float("nan"), torch.exp2(log_m[i] + log_s)).float() if amax_rule else None
        state = policy.update(state, found.float(), config, amax)
    found = (log_m + log_r + log_scales) > overflow_at
    # Elements at or below 2^-25 after scaling: a log-normal tail below the largest element.
    z = (-25.0 - (log_m - MEDIAN_BELOW_MAX + log_scales)) / SPREAD
    underflow = torch.where(found, 0.0, torch.special.ndtr(z))
    applied = (~found).sum(0).double()
    return {
        "skipped": float(found.sum(0).double().mean()),
        "mean log2 scale": float(log_scales.mean()),
        "underflow": float((underflow.sum(0) / applied).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    start = time.perf_counter()
    lines = [
        f"{args.steps} steps x {args.seeds} seeds per trace; per rule: skipped steps (mean over seeds), their "
        "ratio to torch's, mean log2 scale, mean underflow fraction of applied steps.",
        "",
        "| trace | rule | skipped | vs torch | mean log2 scale | underflow |",
        "|---|---|---|---|---|---|",
    ]
    for name in TRACES:
        log_m, log_r = trace(name, args.steps, args.seeds)
        results = {rule: replay(config, log_m, log_r) for rule, config in rules().items()}
        base = results["torch"]["skipped"]
        for rule, r in results.items():
            ratio = r["skipped"] / base if base else math.nan
            lines.append(
                f"| {name} | {rule} | {r['skipped']:.1f} | {ratio:.2f} | {r['mean log2 scale']:.2f} | "
                f"{r['underflow']:.2e} |"
            )
    lines.append("")
    lines.append(f"({time.perf_counter() - start:.0f} s on the CPU)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
