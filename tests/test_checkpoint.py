"""state_dict / load_state_dict: plain data, round trips, torch interoperability, bad states."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

import distscale
from distscale import GradScaler
from distscale.checkpoint import FORMAT_VERSION
from tests.tiny import make, one_step

INF = float("inf")
NAN = float("nan")
TORCH_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def trained(overflows=(1, 4, 5), steps=8, **kwargs):
    """A scaler (and model) after a few steps with overflows, so no field is at its initial value."""
    args = {"init_scale": 2.0**10, "growth_interval": 2, "hysteresis": 2, "min_scale": 1.0, **kwargs}
    scaler = GradScaler("cpu", **args)
    model, opt = make()
    for step in range(steps):
        one_step(scaler, model, opt, step, overflow=step in overflows)
    return scaler, model, opt


def _plain(value, path="state_dict"):
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a non-string key {key!r}"
            _plain(item, f"{path}[{key!r}]")
        return
    if isinstance(value, list):  # the skip rules' histories: lists of floats
        for i, item in enumerate(value):
            assert type(item) is float, f"{path}[{i}] is {type(item).__name__}"
        return
    assert value is None or type(value) in (int, float, str, bool), f"{path} is {type(value).__name__}"


# ------------------------------------------------------------------------------ the format


def test_state_dict_is_plain_data():
    scaler, _, _ = trained()
    state = scaler.state_dict()
    _plain(state)
    assert state["format_version"] == FORMAT_VERSION
    assert type(state["format_version"]) is int
    assert TORCH_KEYS <= set(state)
    assert set(state) == TORCH_KEYS | {"format_version", "config", "state", "stats", "rules"}
    assert set(state["state"]) == set(distscale.ScaleState._fields)
    assert set(state["config"]) == {f.name for f in distscale.ScalerConfig.__dataclass_fields__.values()}


def test_state_dict_values_describe_the_scaler():
    scaler, _, _ = trained()
    state = scaler.state_dict()
    inner = state["state"]
    # The torch-compatible keys duplicate the authoritative entries.
    assert state["scale"] == inner["scale"] == scaler.get_scale()
    assert state["_growth_tracker"] == inner["growth_tracker"]
    assert state["growth_factor"] == state["config"]["growth_factor"] == scaler.get_growth_factor()
    assert state["backoff_factor"] == state["config"]["backoff_factor"] == scaler.get_backoff_factor()
    assert state["growth_interval"] == state["config"]["growth_interval"] == scaler.get_growth_interval()
    assert state["config"]["hysteresis"] == 2
    assert state["config"]["min_scale"] == 1.0
    assert state["config"]["max_scale"] is None
    # 8 updates, 3 of them skipped.
    assert inner["num_updates"] == 8
    assert inner["num_skipped"] == 3
    assert inner["num_min_scale_events"] == 0


def test_state_dict_before_first_scale():
    scaler = GradScaler("cpu", init_scale=300.0, growth_interval=5)
    state = scaler.state_dict()
    _plain(state)
    assert state["scale"] == 300.0
    assert state["_growth_tracker"] == 0
    assert state["state"]["hysteresis_tracker"] == 1
    assert state["state"]["num_updates"] == 0


def test_torch_save_load_weights_only_round_trip():
    scaler, _, _ = trained()
    state = scaler.state_dict()
    buffer = io.BytesIO()
    torch.save({"scaler": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["scaler"]
    assert loaded == state
    fresh = GradScaler("cpu")
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state
    assert fresh.get_scale() == scaler.get_scale()
    assert fresh.config == scaler.config


def test_load_state_dict_copies_values():
    scaler, _, _ = trained()
    state = scaler.state_dict()
    fresh = GradScaler("cpu")
    fresh.load_state_dict(state)
    state["state"]["scale"] = 1.0
    state["scale"] = 1.0
    assert fresh.get_scale() == scaler.get_scale() != 1.0


def test_load_before_first_scale_then_training_continues():
    source = GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    model, opt = make()
    for step in range(2):  # two clean steps: growth_tracker = 2, one short of growing
        one_step(source, model, opt, step)
    state = source.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (2.0**12, 2)

    fresh = GradScaler("cpu")  # different defaults: the loaded settings must win
    fresh.load_state_dict(state)
    assert fresh.get_scale() == 2.0**12
    assert fresh.get_growth_interval() == 3
    model2, opt2 = make()
    loss = model2(torch.ones(1, 6)).sum()
    assert torch.equal(fresh.scale(loss), loss * 2.0**12)
    # Third clean step in a row grows the scale (the tracker was restored, not reset).
    assert one_step(fresh, model2, opt2, 0) == 2.0**13
    assert fresh.state_dict()["state"]["num_updates"] == 3


def test_resume_reproduces_trajectory_bitwise():
    # hysteresis=2, growth_interval=3. Checkpoint after step 3, when one hysteresis unit is spent:
    # the overflow at step 4 must back off in the resumed run as in the original one.
    overflows = {2, 4, 9, 10, 14, 15, 16}
    k, steps = 3, 20
    scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=3, hysteresis=2)
    model, opt = make()
    scales, params, saved = [], [], None
    for step in range(steps):
        scales.append(one_step(scaler, model, opt, step, step in overflows))
        params.append([p.detach().clone() for p in model.parameters()])
        if step == k:
            saved = (scaler.state_dict(), copy.deepcopy(model), copy.deepcopy(opt.state_dict()))
    assert saved is not None
    assert saved[0]["state"]["hysteresis_tracker"] == 1
    assert saved[0]["state"]["growth_tracker"] == 1

    def resume(state):
        resumed = GradScaler("cpu", init_scale=1.0, growth_interval=1000, hysteresis=2)
        resumed.load_state_dict(state)
        model2 = copy.deepcopy(saved[1])
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
        opt2.load_state_dict(copy.deepcopy(saved[2]))
        out_scales, out_params = [], []
        for step in range(k + 1, steps):
            out_scales.append(one_step(resumed, model2, opt2, step, step in overflows))
            out_params.append([p.detach().clone() for p in model2.parameters()])
        return resumed, out_scales, out_params

    resumed, resumed_scales, resumed_params = resume(saved[0])
    assert resumed_scales == scales[k + 1 :]
    for a, b in zip(resumed_params, params[k + 1 :], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert resumed.state_dict() == scaler.state_dict()
    # The trajectory holds both backoffs and growths after k.
    tail = scales[k:]
    assert any(b < a for a, b in itertools.pairwise(tail))
    assert any(b > a for a, b in itertools.pairwise(tail))

    # Sensitivity check: torch's five keys alone lose the spent hysteresis unit, so the overflow
    # at step 4 would be tolerated instead of backing off.
    torch_only = {key: saved[0][key] for key in TORCH_KEYS}
    _, lossy_scales, _ = resume(torch_only)
    assert lossy_scales[0] != scales[k + 1]


# ------------------------------------------------------------------------ torch interop


def _lockstep(a, b, model_a, opt_a, model_b, opt_b, start, steps, overflows):
    for step in range(start, start + steps):
        sa = one_step(a, model_a, opt_a, step, step in overflows)
        sb = one_step(b, model_b, opt_b, step, step in overflows)
        assert sa == sb, step
        assert all(torch.equal(x, y) for x, y in zip(model_a.parameters(), model_b.parameters(), strict=True))


@pytest.mark.parametrize("before_first_scale", [True, False], ids=["fresh", "initialised"])
def test_torch_state_dict_loads_into_distscale(before_first_scale):
    theirs = torch.amp.GradScaler(
        "cpu", init_scale=2.0**9, growth_factor=3.0, backoff_factor=0.25, growth_interval=3
    )
    model_t, opt_t = make()
    for step in range(7):
        one_step(theirs, model_t, opt_t, step, overflow=step == 2)
    state = theirs.state_dict()
    assert state["_growth_tracker"] > 0

    ours = GradScaler("cpu")
    model_o, opt_o = make()
    if not before_first_scale:
        one_step(ours, model_o, opt_o, 0)
    model_o.load_state_dict(model_t.state_dict())
    opt_o.load_state_dict(copy.deepcopy(opt_t.state_dict()))  # no shared momentum
    ours.load_state_dict(state)
    assert ours.get_scale() == theirs.get_scale()
    assert ours.get_growth_factor() == 3.0
    assert ours.get_backoff_factor() == 0.25
    assert ours.get_growth_interval() == 3
    assert ours.state_dict()["_growth_tracker"] == state["_growth_tracker"]
    assert {k: ours.state_dict()[k] for k in TORCH_KEYS} == state
    _lockstep(ours, theirs, model_o, opt_o, model_t, opt_t, 7, 12, overflows={9, 10, 15})


@pytest.mark.parametrize("before_first_scale", [True, False], ids=["fresh", "initialised"])
def test_distscale_state_dict_loads_into_torch(before_first_scale):
    ours = GradScaler("cpu", init_scale=2.0**9, growth_factor=3.0, backoff_factor=0.25, growth_interval=3)
    model_o, opt_o = make()
    for step in range(7):
        one_step(ours, model_o, opt_o, step, overflow=step == 2)
    state = ours.state_dict()
    assert state["_growth_tracker"] > 0

    theirs = torch.amp.GradScaler("cpu")
    model_t, opt_t = make()
    if not before_first_scale:
        one_step(theirs, model_t, opt_t, 0)
    model_t.load_state_dict(model_o.state_dict())
    opt_t.load_state_dict(copy.deepcopy(opt_o.state_dict()))  # no shared momentum
    theirs.load_state_dict(state)
    assert theirs.state_dict() == {k: state[k] for k in TORCH_KEYS}
    _lockstep(ours, theirs, model_o, opt_o, model_t, opt_t, 7, 12, overflows={9, 10, 15})


def test_torch_format_keeps_settings_torch_does_not_store():
    ours = GradScaler("cpu", hysteresis=3, min_scale=2.0, max_scale=2.0**20)
    torch_state = torch.amp.GradScaler("cpu", init_scale=2.0**11, growth_interval=10).state_dict()
    ours.load_state_dict(torch_state)
    config = ours.config
    assert (config.hysteresis, config.min_scale, config.max_scale) == (3, 2.0, 2.0**20)
    assert config.growth_interval == 10
    inner = ours.state_dict()["state"]
    assert inner["scale"] == 2.0**11
    assert inner["hysteresis_tracker"] == 3
    assert (inner["num_updates"], inner["num_skipped"], inner["num_min_scale_events"]) == (0, 0, 0)


# ----------------------------------------------------------------------------- bad states


def _set(path, value):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _del(path):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _both(inner, top, value):
    # The authoritative entry and its torch-compatible duplicate, so the value check is reached.
    def edit(state):
        state["state"][inner] = value
        state[top] = value

    return edit


def _config_both(key, value):
    def edit(state):
        state["config"][key] = value
        if key in state:
            state[key] = value

    return edit


BAD = {
    "version-next": (_set(["format_version"], FORMAT_VERSION + 1), ValueError, "format_version"),
    "version-0": (_set(["format_version"], 0), ValueError, "format_version"),
    "version-str": (_set(["format_version"], "1"), ValueError, "format_version"),
    "version-None": (_set(["format_version"], None), ValueError, "format_version"),
    "missing-state": (_del(["state"]), ValueError, "'state'"),
    "missing-config": (_del(["config"]), ValueError, "'config'"),
    "missing-torch-key": (_del(["_growth_tracker"]), ValueError, "'_growth_tracker'"),
    "extra-key": (_set(["surprise"], 1), ValueError, "'surprise'"),
    "missing-state-key": (_del(["state", "num_skipped"]), ValueError, "'num_skipped'"),
    "extra-state-key": (_set(["state", "bonus"], 0), ValueError, "'bonus'"),
    "missing-config-key": (_del(["config", "hysteresis"]), ValueError, "'hysteresis'"),
    "extra-config-key": (_set(["config", "warmup"], 3), ValueError, "'warmup'"),
    "config-not-mapping": (_set(["config"], 5), ValueError, "config"),
    "state-not-mapping": (_set(["state"], [1, 2]), ValueError, "state"),
    "scale-str": (_both("scale", "scale", "big"), TypeError, "scale"),
    "scale-None": (_both("scale", "scale", None), TypeError, "scale"),
    "scale-negative": (_both("scale", "scale", -1.0), ValueError, "scale"),
    "scale-zero": (_both("scale", "scale", 0.0), ValueError, "scale"),
    "scale-inf": (_both("scale", "scale", INF), ValueError, "scale"),
    "scale-nan": (_both("scale", "scale", NAN), ValueError, "scale"),
    "growth-tracker-negative": (_both("growth_tracker", "_growth_tracker", -1), ValueError, "growth_tracker"),
    "growth-tracker-float": (_both("growth_tracker", "_growth_tracker", 1.5), TypeError, "growth_tracker"),
    "hysteresis-tracker-too-big": (
        _set(["state", "hysteresis_tracker"], 3),
        ValueError,
        "hysteresis_tracker",
    ),
    "hysteresis-tracker-negative": (
        _set(["state", "hysteresis_tracker"], -1),
        ValueError,
        "hysteresis_tracker",
    ),
    "num-updates-negative": (_set(["state", "num_updates"], -3), ValueError, "num_updates"),
    "num-skipped-str": (_set(["state", "num_skipped"], "7"), TypeError, "num_skipped"),
    "min-events-bool": (_set(["state", "num_min_scale_events"], True), TypeError, "num_min_scale_events"),
    "steps-since-rescale-negative": (
        _set(["state", "steps_since_rescale"], -1),
        ValueError,
        "steps_since_rescale",
    ),
    "overflows-float": (
        _set(["state", "overflows_since_backoff"], 1.0),
        TypeError,
        "overflows_since_backoff",
    ),
    "amax-window-negative": (_set(["state", "amax_window"], -1.0), ValueError, "amax_window"),
    "amax-window-inf": (_set(["state", "amax_window"], math.inf), ValueError, "amax_window"),
    "amax-window-str": (_set(["state", "amax_window"], "0"), TypeError, "amax_window"),
    "missing-new-state-key": (_del(["state", "steps_since_rescale"]), ValueError, "'steps_since_rescale'"),
    "missing-new-config-key": (_del(["config", "tolerance"]), ValueError, "'tolerance'"),
    "growth-tracker-below-delay": (
        _both("growth_tracker", "_growth_tracker", -1),
        ValueError,
        "growth_tracker",
    ),
    "tolerance-negative": (_config_both("tolerance", -0.5), ValueError, "tolerance"),
    "min-scale-rule": (_config_both("min_scale_rule", "bounce"), ValueError, "min_scale_rule"),
    "growth-delay-float": (_config_both("growth_delay", 1.5), TypeError, "growth_delay"),
    "growth-factor": (_config_both("growth_factor", 0.5), ValueError, "growth_factor"),
    "backoff-factor": (_config_both("backoff_factor", 1.5), ValueError, "backoff_factor"),
    "growth-interval": (_config_both("growth_interval", 0), ValueError, "growth_interval"),
    "hysteresis-zero": (_config_both("hysteresis", 0), ValueError, "hysteresis"),
    "on-min-scale": (_config_both("on_min_scale", "explode"), ValueError, "on_min_scale"),
    "min-above-max": (_config_both("max_scale", 0.5), ValueError, "max_scale"),
    "dup-scale": (lambda s: s.__setitem__("scale", s["scale"] * 2), ValueError, "'scale'"),
    "dup-growth-tracker": (
        lambda s: s.__setitem__("_growth_tracker", s["_growth_tracker"] + 1),
        ValueError,
        "'_growth_tracker'",
    ),
    "dup-growth-factor": (_set(["growth_factor"], 3.0), ValueError, "'growth_factor'"),
    "dup-backoff-factor": (_set(["backoff_factor"], 0.25), ValueError, "'backoff_factor'"),
    "dup-growth-interval": (_set(["growth_interval"], 17), ValueError, "'growth_interval'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_raises_and_leaves_scaler_unchanged(case):
    edit, exc, key = BAD[case]
    source, _, _ = trained()
    state = copy.deepcopy(source.state_dict())
    edit(state)
    target, model, opt = trained(overflows=(0,), steps=3, init_scale=2.0**5)
    before = target.state_dict()
    with pytest.raises(exc) as info:
        target.load_state_dict(state)
    assert isinstance(info.value, (ValueError, TypeError, RuntimeError))
    assert key in str(info.value), str(info.value)
    assert target.state_dict() == before
    # Still usable, and still following its own settings.
    one_step(target, model, opt, 3)
    assert target.state_dict()["state"]["num_updates"] == before["state"]["num_updates"] + 1


TORCH_BAD = {
    "scale-negative": ({"scale": -1.0}, ValueError, "scale"),
    "scale-str": ({"scale": "big"}, TypeError, "scale"),
    "tracker-negative": ({"_growth_tracker": -2}, ValueError, "growth_tracker"),
    "growth-factor": ({"growth_factor": 0.5}, ValueError, "growth_factor"),
    "growth-interval-float": ({"growth_interval": 2.5}, TypeError, "growth_interval"),
    "missing-key": ({"backoff_factor": None}, ValueError, "'backoff_factor'"),
    "extra-key": ({"extra": 1}, ValueError, "'extra'"),
}


@pytest.mark.parametrize("case", list(TORCH_BAD))
def test_bad_torch_format_state_raises_and_leaves_scaler_unchanged(case):
    changes, exc, key = TORCH_BAD[case]
    state = torch.amp.GradScaler("cpu").state_dict()
    for name, value in changes.items():
        if value is None:
            del state[name]
        else:
            state[name] = value
    target, _, _ = trained()
    before = target.state_dict()
    with pytest.raises(exc) as info:
        target.load_state_dict(state)
    assert key in str(info.value), str(info.value)
    assert target.state_dict() == before


@pytest.mark.parametrize("bad", [{}, [], 5], ids=["empty", "list", "int"])
def test_empty_or_non_mapping_state(bad):
    target, _, _ = trained()
    before = target.state_dict()
    exc = RuntimeError if bad == {} else (TypeError, RuntimeError)
    with pytest.raises(exc) as info:
        target.load_state_dict(bad)
    if bad == {}:
        # torch's own wording: a disabled scaler saves {}.
        with pytest.raises(RuntimeError) as torch_info:
            torch.amp.GradScaler("cpu").load_state_dict({})
        assert str(info.value) == str(torch_info.value)
    assert target.state_dict() == before


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_format_version_must_be_the_int(version):
    scaler = GradScaler("cpu")
    state = scaler.state_dict()
    state["format_version"] = version
    before = scaler.state_dict()
    with pytest.raises(ValueError, match="format_version"):
        scaler.load_state_dict(state)
    assert scaler.state_dict() == before


def test_loaded_scale_must_lie_within_the_bounds():
    scaler = GradScaler("cpu", init_scale=8.0, min_scale=4.0, max_scale=16.0)
    state = scaler.state_dict()
    for bad in (2.0, 32.0):
        state["state"]["scale"] = state["scale"] = bad
        with pytest.raises(ValueError, match=r"scale .* outside \[min_scale, max_scale\]"):
            scaler.load_state_dict(state)
        assert scaler.get_scale() == 8.0


# ------------------------------------------------------------------ format versions, preset state


def _as_version(state, version):
    """What an older distscale wrote: format ``version``, without the settings, counters and
    stats later formats added (each declares the version that introduced it)."""
    from distscale import checkpoint

    old = copy.deepcopy(state)
    old["format_version"] = version
    for key, since in checkpoint.CONFIG_SINCE.items():
        if since > version:
            del old["config"][key]
    for key, spec in checkpoint.STATE_FIELDS.items():
        if spec.since > version:
            del old["state"][key]
    if version < checkpoint.RULES_SINCE:
        del old["rules"]
    if version < checkpoint.STATS_SINCE:
        del old["stats"]
    else:
        for key, spec in checkpoint.STATS_FIELDS.items():
            if spec.since > version:
                del old["stats"][key]
    return old


def _as_version_1(state):
    """What distscale 0.1 wrote: format 1, without the settings and counters format 2 added."""
    old = _as_version(state, 1)
    assert "min_scale_rule" not in old["config"] and "steps_since_rescale" not in old["state"]
    return old


def test_version_1_state_dict_loads_with_new_fields_at_their_defaults():
    source, _, _ = trained()
    state = source.state_dict()
    assert FORMAT_VERSION == 5
    target = GradScaler("cpu", tolerance=0.5, growth_delay=3, min_scale_rule="refuse")
    target.load_state_dict(_as_version_1(state))
    config = target.config
    assert (config.min_scale_rule, config.growth_delay, config.tolerance) == ("floor", 0, 0.0)
    assert config == source.config
    loaded = target.state_dict()
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["state"] == {**state["state"], "steps_since_rescale": 0, "overflows_since_backoff": 0}


def test_version_3_state_dict_loads_with_torchs_rule_and_fresh_amax_fields():
    source, _, _ = trained()
    state = source.state_dict()
    target = GradScaler("cpu", rule="amax", amax_margin=8.0)
    target.load_state_dict(_as_version(state, 3))
    assert (target.config.rule, target.config.amax_margin) == ("torch", 8.0)  # version 3's only rule
    loaded = target.state_dict()
    assert loaded["state"] == {**state["state"], "calibrated": 0, "amax_window": 0.0}
    assert loaded["stats"] == {**state["stats"], "amax": None, "headroom_log2": None, "scale_change": 0}
    with pytest.raises(ValueError, match=r"missing \['amax'"):
        broken = copy.deepcopy(state)
        del broken["stats"]["amax"]  # a version-4 state must have every version-4 key
        GradScaler("cpu").load_state_dict(broken)


def test_version_1_keys_are_checked_for_version_1():
    state = _as_version_1(GradScaler("cpu").state_dict())
    state["state"]["steps_since_rescale"] = 0  # a format-2 key in a format-1 state
    with pytest.raises(ValueError, match="'steps_since_rescale'"):
        GradScaler("cpu").load_state_dict(state)


PRESETS = {
    # DeepSpeed: growth_delay=1 puts the growth tracker at -1 after an overflow.
    "deepspeed": lambda: GradScaler.from_deepspeed_config(
        {"initial_scale_power": 10, "loss_scale_window": 2, "hysteresis": 2}, "cpu"
    ),
    # fairseq: tolerance reads steps_since_rescale and overflows_since_backoff.
    "fairseq": lambda: GradScaler.from_fairseq("cpu", init_scale=2.0**10, scale_window=2, tolerance=0.4),
    "megatron": lambda: GradScaler.from_megatron("cpu", initial_loss_scale=2.0**10, loss_scale_window=2),
}


@pytest.mark.parametrize(("preset", "k"), [("deepspeed", 6), ("fairseq", 3), ("megatron", 5)])
def test_preset_resume_is_bitwise(preset, k):
    overflows = {1, 2, 5, 6, 7, 10, 13, 14}
    steps = 20
    scaler = PRESETS[preset]()
    model, opt = make()
    scales, saved = [], None
    for step in range(steps):
        scales.append(one_step(scaler, model, opt, step, step in overflows))
        if step == k:
            saved = (scaler.state_dict(), copy.deepcopy(model), copy.deepcopy(opt.state_dict()))
    assert saved is not None
    if preset == "deepspeed":
        assert saved[0]["state"]["growth_tracker"] == -1 == saved[0]["_growth_tracker"]
    if preset == "fairseq":
        assert (
            saved[0]["state"]["steps_since_rescale"] > 0 or saved[0]["state"]["overflows_since_backoff"] > 0
        )
    buffer = io.BytesIO()
    torch.save(saved[0], buffer)
    buffer.seek(0)
    resumed = GradScaler("cpu")  # torch's defaults: the checkpoint carries the preset's rule
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.config == scaler.config
    model2 = copy.deepcopy(saved[1])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved[2])
    tail = [one_step(resumed, model2, opt2, step, step in overflows) for step in range(k + 1, steps)]
    assert tail == scales[k + 1 :]
    assert resumed.state_dict() == scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model.parameters(), strict=True))
