"""The scaler's state as plain data: build, validate, and convert.

Format (version 3), every value a Python number, string, bool or None, so
``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` take it as is::

    {"format_version": 3,
     "config": {init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                hysteresis_refill, min_scale, max_scale, on_min_scale,
                min_scale_rule, growth_delay, tolerance},
     "state": {scale, growth_tracker, hysteresis_tracker, num_updates, num_skipped,
               num_min_scale_events, steps_since_rescale, overflows_since_backoff},
     "stats": {overflows, consecutive_overflows, max_consecutive_overflows, steps_since_overflow,
               steps_at_min_scale, step_was_skipped, grad_norm, zero_fraction, underflow_fraction},
               # None where not measured (NaN on the device), so equal states compare equal
     # torch.amp.GradScaler's five keys, so either scaler loads the other's checkpoint:
     "scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}

Version 1 (distscale 0.1: no ``min_scale_rule``, ``growth_delay``, ``tolerance``,
``steps_since_rescale``, ``overflows_since_backoff``) still loads: the new settings take their
defaults (the rule version 1 could express) and the new counters start at zero. Versions 1 and
2 have no ``stats`` (see :mod:`distscale.stats`): they start fresh, so a resumed run's metrics
count from the resume.

``validate`` checks everything before anything is applied, so a bad state leaves the scaler as
it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from distscale.config import ScalerConfig
from distscale.stats import INITIAL as STATS_INITIAL
from distscale.stats import STATS_DTYPES

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
TORCH_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})
STATE_KEYS = (
    "scale",
    "growth_tracker",
    "hysteresis_tracker",
    "num_updates",
    "num_skipped",
    "num_min_scale_events",
    "steps_since_rescale",
    "overflows_since_backoff",
)
TOP_KEYS = frozenset({"format_version", "config", "state"}) | TORCH_KEYS
STATS_KEYS = frozenset(STATS_DTYPES)
CONFIG_KEYS = frozenset(ScalerConfig.__dataclass_fields__)
# What version 1 lacks; loading it fills these with their defaults.
V2_CONFIG_KEYS = frozenset({"min_scale_rule", "growth_delay", "tolerance"})
V2_STATE_DEFAULTS = {"steps_since_rescale": 0, "overflows_since_backoff": 0}
EXPECTED_KEYS = {
    1: (CONFIG_KEYS - V2_CONFIG_KEYS, frozenset(STATE_KEYS) - set(V2_STATE_DEFAULTS)),
    2: (CONFIG_KEYS, frozenset(STATE_KEYS)),
    3: (CONFIG_KEYS, frozenset(STATE_KEYS)),
}


def build(
    config: ScalerConfig, state: Mapping[str, int | float], stats: Mapping[str, int | float | bool]
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state": dict(state),
        # NaN ("not measured") is stored as None, so equal states compare equal.
        "stats": {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()},
        "scale": float(state["scale"]),
        "growth_factor": config.growth_factor,
        "backoff_factor": config.backoff_factor,
        "growth_interval": config.growth_interval,
        "_growth_tracker": int(state["growth_tracker"]),
    }


def _keys_error(where: str, got: set[str], expected: frozenset[str] | set[str]) -> ValueError:
    missing, extra = sorted(expected - got), sorted(got - expected)
    return ValueError(
        f"GradScaler state_dict {where} has the wrong keys: missing {missing}, unexpected {extra}."
    )


def _int(where: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"GradScaler state_dict {where} must be an int, got {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"GradScaler state_dict {where} must be {bound}, got {value}.")
    return value


def _stats(raw: object) -> dict[str, int | float | bool]:
    if not isinstance(raw, Mapping) or set(raw) != STATS_KEYS:
        raise _keys_error("['stats']", set(raw) if isinstance(raw, Mapping) else set(), STATS_KEYS)
    values: dict[str, int | float | bool] = {}
    for key, dtype in STATS_DTYPES.items():
        value = raw[key]
        where = f"stats[{key!r}]"
        if dtype is torch.bool:
            if not isinstance(value, bool):
                raise TypeError(f"GradScaler state_dict {where} must be a bool, got {type(value).__name__}.")
            values[key] = value
        elif dtype.is_floating_point:
            if value is None:  # not measured (NaN on the device)
                values[key] = math.nan
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"GradScaler state_dict {where} must be a float or None, got {type(value).__name__}."
                )
            high = 1.0 if key.endswith("_fraction") else math.inf
            if not (math.isnan(value) or 0.0 <= value <= high):
                raise ValueError(
                    f"GradScaler state_dict {where} must be None or in [0, {high}], got {value!r}."
                )
            values[key] = float(value)
        else:
            values[key] = _int(where, value, 0)
    return values


def validate(
    state_dict: Mapping[str, Any], current: ScalerConfig
) -> tuple[ScalerConfig, dict[str, Any], dict[str, int | float | bool]]:
    """Return (config, state values, stats) from ``state_dict``, or raise without side effects.

    Accepts this module's format and torch.amp.GradScaler's (its five keys; the counters then
    start at zero and the settings torch does not store keep ``current``'s values).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}.")
    if len(state_dict) == 0:
        raise RuntimeError(
            "The source state dict is empty, possibly because it was saved "
            "from a disabled instance of GradScaler."
        )
    keys = set(state_dict)
    stats: dict[str, int | float | bool] = dict(STATS_INITIAL)
    if "format_version" not in keys:
        if keys != TORCH_KEYS:
            raise _keys_error("(torch.amp.GradScaler format)", keys, TORCH_KEYS)
        config = replace(
            current,
            growth_factor=state_dict["growth_factor"],
            backoff_factor=state_dict["backoff_factor"],
            growth_interval=state_dict["growth_interval"],
        )
        raw = {
            "scale": state_dict["scale"],
            "growth_tracker": state_dict["_growth_tracker"],
            "hysteresis_tracker": config.hysteresis,
            "num_updates": 0,
            "num_skipped": 0,
            "num_min_scale_events": 0,
            **V2_STATE_DEFAULTS,
        }
    else:
        version = state_dict["format_version"]
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(
                f"GradScaler state_dict format_version {version!r} is not supported "
                f"(this distscale reads versions {list(READABLE_VERSIONS)})."
            )
        top_keys = TOP_KEYS | {"stats"} if version >= 3 else TOP_KEYS
        if keys != top_keys:
            raise _keys_error("", keys, top_keys)
        if version >= 3:
            stats = _stats(state_dict["stats"])
        cfg, raw = state_dict["config"], state_dict["state"]
        config_keys, state_keys = EXPECTED_KEYS[version]
        if not isinstance(cfg, Mapping) or set(cfg) != config_keys:
            raise _keys_error("['config']", set(cfg) if isinstance(cfg, Mapping) else set(), config_keys)
        if not isinstance(raw, Mapping) or set(raw) != state_keys:
            raise _keys_error("['state']", set(raw) if isinstance(raw, Mapping) else set(), state_keys)
        raw = {**V2_STATE_DEFAULTS, **raw}
        config = ScalerConfig(**cfg)  # validates every setting; version 1 gets the new defaults
        # The torch-compatible duplicates must agree with the authoritative entries.
        duplicates = {
            "scale": raw["scale"],
            "growth_factor": config.growth_factor,
            "backoff_factor": config.backoff_factor,
            "growth_interval": config.growth_interval,
            "_growth_tracker": raw["growth_tracker"],
        }
        for key, value in duplicates.items():
            if state_dict[key] != value:
                raise ValueError(
                    f"GradScaler state_dict[{key!r}]={state_dict[key]!r} disagrees with the "
                    f"format-{version} entry {value!r}; the checkpoint was edited or corrupted."
                )
    scale = raw["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"GradScaler state_dict scale must be a float, got {type(scale).__name__}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"GradScaler state_dict scale must be finite and > 0, got {scale!r}.")
    if not config.contains(float(scale)):
        raise ValueError(
            f"GradScaler state_dict scale {scale!r} is outside [min_scale, max_scale] = "
            f"[{config.min_scale}, {config.max_scale}]."
        )
    values: dict[str, Any] = {"scale": float(scale)}
    # growth_delay restarts the tracker below zero after an overflow.
    values["growth_tracker"] = _int("growth_tracker", raw["growth_tracker"], -config.growth_delay)
    values["hysteresis_tracker"] = _int("hysteresis_tracker", raw["hysteresis_tracker"], 0, config.hysteresis)
    for key in ("num_updates", "num_skipped", "num_min_scale_events", *V2_STATE_DEFAULTS):
        values[key] = _int(key, raw[key], 0)
    return config, values, stats
