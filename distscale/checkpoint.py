"""The scaler's state as plain data: build, validate, and convert.

Format (version 5), every value a Python number, string, bool, None or list of floats, so
``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` take it as is::

    {"format_version": 5,
     "config": every ScalerConfig setting, by name,
     "state": every field of policy.ScaleState, by name,
     "stats": every field of stats.ScalerStats, by name (None where not measured: NaN on the
              device, so equal states compare equal),
     "rules": every field of rules.RuleState, by name (the histories as lists of spike_window floats),
     # torch.amp.GradScaler's five keys, so either scaler loads the other's checkpoint:
     "scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}

The keys and the version derive from the fields' declarations (:mod:`distscale.fields`): each
field names the version that introduced it, and a checkpoint of an older version loads with the
newer fields at their initial values. Version 1 (distscale 0.1) lacks ``min_scale_rule``,
``growth_delay``, ``tolerance`` (defaults: the rule version 1 could express),
``steps_since_rescale`` and ``overflows_since_backoff``; versions 1 and 2 have no ``stats`` (a
resumed run's metrics count from the resume). Version 4 added the "amax" rule's settings and
fields; version 5 the skip rules (``rules``): a version-4 checkpoint keeps the loading scaler's
skip settings (they add to the decision, not to the scale rule the checkpoint expressed) and
starts their statistics empty.

``validate`` checks everything before anything is applied, so a bad state leaves the scaler as
it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from distscale import fields
from distscale.config import SPIKE_THRESHOLDS, ScalerConfig
from distscale.policy import ScaleState
from distscale.rules import NOT_CLEAN_YET, RuleState
from distscale.stats import ScalerStats

STATE_FIELDS = fields.fields(ScaleState)
STATS_FIELDS = fields.fields(ScalerStats)
RULES_FIELDS = fields.fields(RuleState)
RULES_SINCE = min(f.since for f in RULES_FIELDS.values())  # versions before have no "rules"
# Settings that only add to the decision (they do not change the scale rule an older checkpoint
# expressed): a checkpoint older than them keeps the loading scaler's values.
DECISION_SETTINGS = (*SPIKE_THRESHOLDS, "spike_window", "spike_warmup", "on_fault", "fault_repeats")
CONFIG_SINCE = {f.name: f.metadata.get("since", 1) for f in dataclasses.fields(ScalerConfig)}
# A field or setting declared with a newer ``since`` raises the version: older checkpoints lack it.
FORMAT_VERSION = max(
    *(f.since for f in (*STATE_FIELDS.values(), *STATS_FIELDS.values(), *RULES_FIELDS.values())),
    *CONFIG_SINCE.values(),
)
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
STATS_SINCE = min(f.since for f in STATS_FIELDS.values())  # versions before have no "stats"
TORCH_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})
TOP_KEYS = frozenset({"format_version", "config", "state"}) | TORCH_KEYS
CONFIG_KEYS = frozenset(CONFIG_SINCE)


def _keys_in(record: dict[str, fields.Field], version: int) -> frozenset[str]:
    return frozenset(name for name, f in record.items() if f.since <= version)


def _plain(value: Any) -> Any:
    # NaN ("not measured") is stored as None, so equal states compare equal.
    return None if isinstance(value, float) and math.isnan(value) else value


def build(
    config: ScalerConfig,
    state: Mapping[str, int | float],
    stats: Mapping[str, int | float | bool],
    rules: Mapping[str, Any],
) -> dict[str, Any]:
    """The format-``FORMAT_VERSION`` state dict of plain values (``state``/``stats``/``rules``: by
    field name; the rules' histories are lists)."""
    return {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state": dict(state),
        "stats": {k: _plain(v) for k, v in stats.items()},
        "rules": {k: [_plain(x) for x in v] if isinstance(v, list) else _plain(v) for k, v in rules.items()},
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


def _stats(raw: object, version: int, config: ScalerConfig) -> dict[str, int | float | bool]:
    expected = _keys_in(STATS_FIELDS, version)
    if not isinstance(raw, Mapping) or set(raw) != expected:
        raise _keys_error("['stats']", set(raw) if isinstance(raw, Mapping) else set(), expected)
    values = fields.initial_values(ScalerStats, config)  # fields newer than the checkpoint start fresh
    for key in expected:
        dtype, value = STATS_FIELDS[key].dtype, raw[key]
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


def _float(where: str, value: object, nullable: bool = False) -> float:
    if value is None and nullable:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        what = "a finite float or None" if nullable else "a finite float"
        raise ValueError(f"GradScaler state_dict {where} must be {what}, got {value!r}.")
    return float(value)


def _rules(raw: object, config: ScalerConfig) -> dict[str, Any]:
    expected = frozenset(RULES_FIELDS)
    if not isinstance(raw, Mapping) or set(raw) != expected:
        raise _keys_error("['rules']", set(raw) if isinstance(raw, Mapping) else set(), expected)
    values: dict[str, Any] = {}
    for key, spec in RULES_FIELDS.items():
        where, value = f"rules[{key!r}]", raw[key]
        if spec.length is not None:
            length = spec.length(config)
            if not isinstance(value, list) or len(value) != length:
                raise ValueError(
                    f"GradScaler state_dict {where} must be a list of {length} floats (spike_window), "
                    f"got {type(value).__name__} of length {len(value) if isinstance(value, list) else '-'}."
                )
            values[key] = [_float(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif spec.dtype.is_floating_point:
            values[key] = _float(where, value, nullable=True)
        else:
            low = {"lone_rank": NOT_CLEAN_YET, "fault_rank": -1}.get(key, 0)
            values[key] = _int(where, value, low)
    return values


def validate(
    state_dict: Mapping[str, Any], current: ScalerConfig
) -> tuple[ScalerConfig, dict[str, Any], dict[str, int | float | bool], dict[str, Any]]:
    """Return (config, state values, stats) from ``state_dict``, or raise without side effects.

    Accepts this module's format and torch.amp.GradScaler's (its five keys; the counters then
    start at zero and the settings torch does not store keep ``current``'s values). Returns
    (config, state values, stats, rules values).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}.")
    if len(state_dict) == 0:
        raise RuntimeError(
            "The source state dict is empty, possibly because it was saved "
            "from a disabled instance of GradScaler."
        )
    keys = set(state_dict)
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
            **fields.initial_values(ScaleState, config),  # the counters torch does not keep start at zero
            "scale": state_dict["scale"],
            "growth_tracker": state_dict["_growth_tracker"],
        }
        stats = fields.initial_values(ScalerStats, config)
    else:
        version = state_dict["format_version"]
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(
                f"GradScaler state_dict format_version {version!r} is not supported "
                f"(this distscale reads versions {list(READABLE_VERSIONS)})."
            )
        top_keys = TOP_KEYS | {"stats"} if version >= STATS_SINCE else TOP_KEYS
        if version >= RULES_SINCE:
            top_keys = top_keys | {"rules"}
        if keys != top_keys:
            raise _keys_error("", keys, top_keys)
        cfg, raw = state_dict["config"], state_dict["state"]
        # Settings newer than the checkpoint take their defaults: the rule older versions expressed.
        config_keys = frozenset(name for name, since in CONFIG_SINCE.items() if since <= version)
        state_keys = _keys_in(STATE_FIELDS, version)
        if not isinstance(cfg, Mapping) or set(cfg) != config_keys:
            raise _keys_error("['config']", set(cfg) if isinstance(cfg, Mapping) else set(), config_keys)
        if not isinstance(raw, Mapping) or set(raw) != state_keys:
            raise _keys_error("['state']", set(raw) if isinstance(raw, Mapping) else set(), state_keys)
        if version < RULES_SINCE:  # the skip rules only add to the decision: the loader's settings
            cfg = {**cfg, **{name: getattr(current, name) for name in DECISION_SETTINGS}}
        config = ScalerConfig(**cfg)  # validates every setting; version 1 gets the new defaults
        # Fields newer than the checkpoint start at their initial values.
        raw = {**fields.initial_values(ScaleState, config), **raw}
        stats = (
            _stats(state_dict["stats"], version, config)
            if version >= STATS_SINCE
            else fields.initial_values(ScalerStats, config)
        )
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
    window = raw["amax_window"]
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise TypeError(f"GradScaler state_dict amax_window must be a float, got {type(window).__name__}.")
    if not (math.isfinite(window) and window >= 0):
        raise ValueError(f"GradScaler state_dict amax_window must be finite and >= 0, got {window!r}.")
    values["amax_window"] = float(window)
    for key in STATE_FIELDS.keys() - values.keys():  # every other field is a counter
        values[key] = _int(key, raw[key], 0)
    if "format_version" in state_dict and state_dict["format_version"] >= RULES_SINCE:
        rule_values = _rules(state_dict["rules"], config)
    else:
        initial = fields.initial_values(RuleState, config)
        rule_values = {
            key: initial[key] if spec.length is None else [initial[key]] * spec.length(config)
            for key, spec in RULES_FIELDS.items()
        }
    return config, {key: values[key] for key in STATE_FIELDS}, stats, rule_values
