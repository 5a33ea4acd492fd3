"""Argument validation of GradScaler / ScalerConfig: bad values fail at construction, loudly.

Every rejection must be a ValueError or TypeError whose message names the argument, states the
constraint and shows the offending value, so a typo in a launch config is self-explanatory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import distscale
from distscale import GradScaler, ScalerConfig

INF = float("inf")
NAN = float("nan")


def _assert_names(err: BaseException, *fragments: str) -> None:
    message = str(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"


# (kwargs, expected exception, fragments the message must contain: argument, constraint, value)
BAD_COMMON = [
    # init_scale: finite and > 0
    ({"init_scale": 0}, ValueError, ["init_scale", "finite and > 0", "0"]),
    ({"init_scale": 0.0}, ValueError, ["init_scale", "finite and > 0", "0.0"]),
    ({"init_scale": -1}, ValueError, ["init_scale", "finite and > 0", "-1"]),
    ({"init_scale": -1.0}, ValueError, ["init_scale", "finite and > 0", "-1.0"]),
    ({"init_scale": INF}, ValueError, ["init_scale", "finite and > 0", "inf"]),
    ({"init_scale": -INF}, ValueError, ["init_scale", "finite and > 0", "-inf"]),
    ({"init_scale": NAN}, ValueError, ["init_scale", "finite and > 0", "nan"]),
    ({"init_scale": "abc"}, TypeError, ["init_scale", "real number", "'abc'"]),
    ({"init_scale": True}, TypeError, ["init_scale", "real number", "True"]),
    ({"init_scale": None}, TypeError, ["init_scale", "real number", "None"]),
    # growth_factor: finite and > 1
    ({"growth_factor": 1.0}, ValueError, ["growth_factor", "> 1", "1.0"]),
    ({"growth_factor": 1}, ValueError, ["growth_factor", "> 1", "1"]),
    ({"growth_factor": 0.5}, ValueError, ["growth_factor", "> 1", "0.5"]),
    ({"growth_factor": -2.0}, ValueError, ["growth_factor", "> 1", "-2.0"]),
    ({"growth_factor": NAN}, ValueError, ["growth_factor", "> 1", "nan"]),
    ({"growth_factor": INF}, ValueError, ["growth_factor", "finite", "inf"]),
    ({"growth_factor": "2"}, TypeError, ["growth_factor", "real number", "'2'"]),
    # backoff_factor: in (0, 1)
    ({"backoff_factor": 0}, ValueError, ["backoff_factor", "(0, 1)", "0"]),
    ({"backoff_factor": 0.0}, ValueError, ["backoff_factor", "(0, 1)", "0.0"]),
    ({"backoff_factor": 1}, ValueError, ["backoff_factor", "(0, 1)", "1"]),
    ({"backoff_factor": 1.0}, ValueError, ["backoff_factor", "(0, 1)", "1.0"]),
    ({"backoff_factor": 1.5}, ValueError, ["backoff_factor", "(0, 1)", "1.5"]),
    ({"backoff_factor": -0.5}, ValueError, ["backoff_factor", "(0, 1)", "-0.5"]),
    ({"backoff_factor": NAN}, ValueError, ["backoff_factor", "(0, 1)", "nan"]),
    ({"backoff_factor": False}, TypeError, ["backoff_factor", "real number", "False"]),
    # growth_interval: int >= 1
    ({"growth_interval": 0}, ValueError, ["growth_interval", ">= 1", "0"]),
    ({"growth_interval": -5}, ValueError, ["growth_interval", ">= 1", "-5"]),
    ({"growth_interval": 1.5}, TypeError, ["growth_interval", "int", "1.5"]),
    ({"growth_interval": 2000.0}, TypeError, ["growth_interval", "int", "2000.0"]),
    ({"growth_interval": True}, TypeError, ["growth_interval", "int", "True"]),
    ({"growth_interval": "10"}, TypeError, ["growth_interval", "int", "'10'"]),
    # hysteresis: int >= 1
    ({"hysteresis": 0}, ValueError, ["hysteresis", ">= 1", "0"]),
    ({"hysteresis": -1}, ValueError, ["hysteresis", ">= 1", "-1"]),
    ({"hysteresis": 2.0}, TypeError, ["hysteresis", "int", "2.0"]),
    ({"hysteresis": True}, TypeError, ["hysteresis", "int", "True"]),
    # min_scale / max_scale: None or finite and > 0
    ({"min_scale": 0.0}, ValueError, ["min_scale", "finite and > 0", "0.0"]),
    ({"min_scale": -1.0}, ValueError, ["min_scale", "finite and > 0", "-1.0"]),
    ({"min_scale": INF}, ValueError, ["min_scale", "finite and > 0", "inf"]),
    ({"min_scale": NAN}, ValueError, ["min_scale", "finite and > 0", "nan"]),
    ({"min_scale": "1"}, TypeError, ["min_scale", "real number", "'1'"]),
    ({"max_scale": 0}, ValueError, ["max_scale", "finite and > 0", "0"]),
    ({"max_scale": -4.0}, ValueError, ["max_scale", "finite and > 0", "-4.0"]),
    ({"max_scale": INF}, ValueError, ["max_scale", "finite and > 0", "inf"]),
    ({"max_scale": NAN}, ValueError, ["max_scale", "finite and > 0", "nan"]),
    ({"max_scale": True}, TypeError, ["max_scale", "real number", "True"]),
    # min_scale <= max_scale
    ({"min_scale": 8.0, "max_scale": 4.0}, ValueError, ["min_scale", "max_scale", "<=", "8.0", "4.0"]),
    ({"min_scale": 2**20, "max_scale": 2**10}, ValueError, ["min_scale", "<=", str(2**20), str(2**10)]),
    # on_min_scale: one of the choices
    ({"on_min_scale": "ignore"}, ValueError, ["on_min_scale", "one of", "'clamp'", "'ignore'"]),
    ({"on_min_scale": "CLAMP"}, ValueError, ["on_min_scale", "one of", "'CLAMP'"]),
    ({"on_min_scale": None}, ValueError, ["on_min_scale", "one of", "None"]),
    # rule: a name that exists; amax_margin: finite and > 1
    ({"rule": "ammax"}, ValueError, ["rule", "one of", "'ammax'"]),
    ({"amax_margin": 1.0}, ValueError, ["amax_margin", "finite and > 1.0", "1.0"]),
    ({"amax_margin": 0.5}, ValueError, ["amax_margin", "finite and > 1.0", "0.5"]),
    ({"amax_margin": INF}, ValueError, ["amax_margin", "finite and > 1.0", "inf"]),
    ({"amax_margin": "2"}, TypeError, ["amax_margin", "real number", "'2'"]),
]

BAD_CONFIG_ONLY = [
    ({"hysteresis_refill": "always"}, ValueError, ["hysteresis_refill", "one of", "'growth'", "'always'"]),
    ({"hysteresis_refill": None}, ValueError, ["hysteresis_refill", "one of", "None"]),
    ({"hysteresis_refill": "Growth"}, ValueError, ["hysteresis_refill", "one of", "'Growth'"]),
]

BAD_SCALER_ONLY = [
    ({"check_consistency": -1}, ValueError, ["check_consistency", ">= 0", "-1"]),
    ({"check_consistency": 1.5}, ValueError, ["check_consistency", "int", "1.5"]),
    ({"check_consistency": True}, ValueError, ["check_consistency", "int", "True"]),
    ({"check_consistency": "10"}, ValueError, ["check_consistency", "int", "'10'"]),
    ({"kernel": "triton_typo"}, ValueError, ["kernel", "one of", "'reference'", "'triton_typo'"]),
    ({"kernel": "TORCH"}, ValueError, ["kernel", "one of", "'TORCH'"]),
    ({"kernel": None}, ValueError, ["kernel", "one of", "None"]),
    ({"device": 0}, TypeError, ["device", "0"]),
    ({"enabled": "yes"}, TypeError, ["enabled", "bool", "'yes'"]),
]


def _ids(cases):
    return [",".join(f"{k}={v!r}" for k, v in kwargs.items()) or "defaults" for kwargs, _, _ in cases]


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"), BAD_COMMON + BAD_CONFIG_ONLY, ids=_ids(BAD_COMMON + BAD_CONFIG_ONLY)
)
def test_scaler_config_rejects(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        ScalerConfig(**kwargs)
    assert type(info.value) in (ValueError, TypeError)
    _assert_names(info.value, *fragments)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"), BAD_COMMON + BAD_SCALER_ONLY, ids=_ids(BAD_COMMON + BAD_SCALER_ONLY)
)
def test_grad_scaler_rejects(kwargs, exc, fragments):
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(exc) as info:
        GradScaler(**kwargs)
    assert type(info.value) in (ValueError, TypeError)
    _assert_names(info.value, *fragments)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_scale": 0.0},
        {"growth_factor": 0.5},
        {"backoff_factor": 1.5},
        {"growth_interval": 0},
        {"hysteresis": 0},
        {"min_scale": 4.0, "max_scale": 2.0},
    ],
    ids=lambda kw: ",".join(kw),
)
def test_grad_scaler_validates_even_when_disabled(kwargs):
    # torch skips validation when disabled; a bad launch config should fail on every machine,
    # not only once scaling is switched on.
    with pytest.raises(ValueError):
        GradScaler("cpu", enabled=False, **kwargs)


GOOD = [
    {},
    {"init_scale": 1},
    {"init_scale": 1e-3},
    {"init_scale": 2.0**100},
    {"growth_factor": 1.0001},
    {"growth_factor": 1000.0},
    {"growth_factor": 3},
    {"backoff_factor": 1e-6},
    {"backoff_factor": 0.999},
    {"growth_interval": 1},
    {"growth_interval": 10**9},
    {"hysteresis": 1},
    {"hysteresis": 7},
    {"min_scale": 1.0},
    {"max_scale": 2.0**24},
    {"min_scale": 1, "max_scale": 2**24},
    {"min_scale": 16.0, "max_scale": 16.0, "init_scale": 16.0},
    {"on_min_scale": "clamp"},
    {"on_min_scale": "warn", "min_scale": 1.0},
    {"on_min_scale": "raise", "min_scale": 1.0},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=_ids([(g, None, None) for g in GOOD]))
def test_good_values_accepted(kwargs):
    config = ScalerConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value
    scaler = GradScaler("cpu", **kwargs)
    assert scaler.is_enabled()
    assert scaler.config == config
    expected_scale = kwargs.get("init_scale", 2.0**16)
    # The scale is float32: compare against the float32 rounding of the requested value.
    assert scaler.get_scale() == torch.tensor(float(expected_scale), dtype=torch.float32).item()


@pytest.mark.parametrize("refill", ["growth", "clean_step"])
def test_good_hysteresis_refill_accepted(refill):
    assert ScalerConfig(hysteresis=3, hysteresis_refill=refill).hysteresis_refill == refill


@pytest.mark.parametrize("kernel", ["auto", "torch", "reference"])
@pytest.mark.parametrize("check_consistency", [0, 1, 100])
def test_good_scaler_only_values_accepted(kernel, check_consistency):
    scaler = GradScaler("cpu", kernel=kernel, check_consistency=check_consistency)
    assert scaler.is_enabled()


def test_defaults_are_torch_defaults():
    ours = GradScaler("cpu")
    theirs = torch.amp.GradScaler("cpu")
    assert ours.get_scale() == theirs.get_scale()
    assert ours.get_growth_factor() == theirs.get_growth_factor()
    assert ours.get_backoff_factor() == theirs.get_backoff_factor()
    assert ours.get_growth_interval() == theirs.get_growth_interval()
    config = ScalerConfig()
    assert (config.hysteresis, config.min_scale, config.max_scale) == (1, None, None)
    assert config.on_min_scale == "clamp"


def test_config_is_frozen():
    config = ScalerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.growth_factor = 0.5  # type: ignore[misc]
    assert config.growth_factor == 2.0


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        ScalerConfig(1024.0)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- setters

SETTER_BAD = [
    ("set_growth_factor", 1.0, ValueError, ["growth_factor", "> 1", "1.0"]),
    ("set_growth_factor", 0.5, ValueError, ["growth_factor", "> 1", "0.5"]),
    ("set_growth_factor", NAN, ValueError, ["growth_factor", "nan"]),
    ("set_growth_factor", INF, ValueError, ["growth_factor", "finite", "inf"]),
    ("set_growth_factor", "2", TypeError, ["growth_factor", "real number", "'2'"]),
    ("set_backoff_factor", 0.0, ValueError, ["backoff_factor", "(0, 1)", "0.0"]),
    ("set_backoff_factor", 1.0, ValueError, ["backoff_factor", "(0, 1)", "1.0"]),
    ("set_backoff_factor", 1.5, ValueError, ["backoff_factor", "(0, 1)", "1.5"]),
    ("set_backoff_factor", -0.5, ValueError, ["backoff_factor", "(0, 1)", "-0.5"]),
    ("set_backoff_factor", NAN, ValueError, ["backoff_factor", "nan"]),
    ("set_growth_interval", 0, ValueError, ["growth_interval", ">= 1", "0"]),
    ("set_growth_interval", -3, ValueError, ["growth_interval", ">= 1", "-3"]),
    ("set_growth_interval", 1.5, TypeError, ["growth_interval", "int", "1.5"]),
    ("set_growth_interval", True, TypeError, ["growth_interval", "int", "True"]),
]


@pytest.mark.parametrize(
    ("setter", "value", "exc", "fragments"), SETTER_BAD, ids=[f"{s}({v!r})" for s, v, _, _ in SETTER_BAD]
)
def test_setters_validate_and_leave_config_unchanged(setter, value, exc, fragments):
    scaler = GradScaler("cpu", growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    before = scaler.config
    with pytest.raises(exc) as info:
        getattr(scaler, setter)(value)
    _assert_names(info.value, *fragments)
    assert scaler.config == before
    assert scaler.get_growth_factor() == 3.0
    assert scaler.get_backoff_factor() == 0.25
    assert scaler.get_growth_interval() == 7


def test_setters_accept_good_values_and_take_effect():
    scaler = GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    scaler.set_growth_factor(3.0)
    scaler.set_backoff_factor(0.25)
    scaler.set_growth_interval(1)
    assert scaler.get_growth_factor() == 3.0
    assert scaler.get_backoff_factor() == 0.25
    assert scaler.get_growth_interval() == 1
    assert scaler.config.growth_factor == 3.0
    # The new settings drive the rule: one clean step grows by 3, one overflow backs off by 1/4.
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.0)
    scaler.scale(param.sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 24.0
    opt.zero_grad()
    scaler.scale(param.sum()).backward()
    param.grad[0] = INF
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 6.0


# ---------------------------------------------------------------------------------------- scale()


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        3,
        2.5,
        None,
        lambda: [torch.ones(2), "x"],
        lambda: (torch.ones(2), [torch.ones(1), 7]),
    ],
    ids=["str", "int", "float", "None", "list-with-str", "nested-with-int"],
)
def test_scale_rejects_non_tensors(bad):
    value = bad() if callable(bad) else bad
    scaler = GradScaler("cpu")
    with pytest.raises(ValueError, match="outputs must be a Tensor or an iterable of Tensors"):
        scaler.scale(value)


def test_scale_error_names_the_bad_value():
    scaler = GradScaler("cpu")
    with pytest.raises(ValueError) as info:
        scaler.scale([torch.ones(1), "x"])
    _assert_names(info.value, "str", "'x'")


# ------------------------------------------------------------------------------ init vs. bounds


@pytest.mark.parametrize(
    "kwargs",
    [{"init_scale": 1.0, "min_scale": 4.0}, {"init_scale": 2.0**20, "max_scale": 2.0**10}],
    ids=["below-min", "above-max"],
)
def test_init_scale_outside_bounds_rejected(kwargs):
    with pytest.raises(ValueError, match="init_scale"):
        ScalerConfig(**kwargs)


def test_backoff_never_raises_the_scale_within_bounds():
    # Companion of the test above: within bounds, a backoff never increases the scale.
    config = ScalerConfig(init_scale=6.0, min_scale=4.0, growth_interval=100)
    state = distscale.policy.init_state(config)
    for _ in range(4):
        new = distscale.policy.update(state, torch.tensor(1.0), config)
        assert new.scale.item() <= state.scale.item()
        assert new.scale.item() >= 4.0
        state = new
    assert state.scale.item() == 4.0


# ------------------------------------------------------------------------------ numbers, new arguments


def test_numpy_scalars_are_accepted_and_stored_as_plain_numbers():
    np = pytest.importorskip("numpy")
    config = ScalerConfig(
        init_scale=np.float32(1024.0), growth_interval=np.int64(7), min_scale=np.float64(1.0)
    )
    assert (config.init_scale, config.growth_interval, config.min_scale) == (1024.0, 7, 1.0)
    assert type(config.init_scale) is float and type(config.growth_interval) is int
    assert all(type(v) in (int, float, str, type(None)) for v in config.to_dict().values())


@pytest.mark.parametrize("refill", ["growth", "clean_step"])
def test_hysteresis_refill_is_a_constructor_argument(refill):
    assert GradScaler("cpu", hysteresis=2, hysteresis_refill=refill).config.hysteresis_refill == refill


def test_bad_hysteresis_refill_through_the_constructor():
    with pytest.raises(ValueError, match=r"hysteresis_refill.*'sometimes'"):
        GradScaler("cpu", hysteresis_refill="sometimes")
