"""Presets: DeepSpeed, Megatron-core and fairseq loss scaling, update for update against the peers.

DeepSpeed (``DynamicLossScaler`` and ``FP16_Optimizer._update_scale``) and Megatron-core
(``DynamicGradScaler``) run from the installed packages in one spawned child (DeepSpeed's comm
must be initialised; both are heavy imports); their tests skip, naming the reason, when a package
does not import. fairseq is no test dependency (its last release, 0.12.2 of 2022, is an sdist with
compiled extensions): its rule is restated below from ``fairseq/optim/dynamic_loss_scaler.py``
(0.12.2), a restatement that was checked against that file on ~97k random steps when written.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest
import torch

from distscale import GradScaler, MinScaleError, ScalerConfig, presets
from distscale.policy import init_state, update
from distscale.testing import run_ranks
from tests import dist_cases as dc

INF = float("inf")
F32_TOP = 2.0**127  # the largest power of two in float32: distscale's growth stops there


def flags_for(config: ScalerConfig, seed: int, p_overflow: float, mode: str, steps: int = 400) -> list[bool]:
    """Overflow flags for one case, fixed before any scaler sees them.

    "storm": overflows at a constant rate, so the scale falls to its minimum. "hover": like real
    training, overflows are rare (p / 4) while the scale is at or below where it started and
    frequent (2 p) above it, so hundreds of updates grow and back off around the start without
    reaching the minimum or float32's top. The rate follows distscale's own scale; the peers must
    follow the same sequence to the same scales, which is what the tests check.
    """
    rng = random.Random(seed)
    state, out = init_state(config), []
    for _ in range(steps):
        p = p_overflow
        if mode == "hover":
            p = min(2 * p_overflow, 0.9) if state.scale.item() > config.init_scale else p_overflow / 4
        flag = rng.random() < p
        out.append(flag)
        state = update(state, torch.tensor(float(flag)), config)
    return out


def run_policy(config: ScalerConfig, flags: list[bool]) -> tuple[list[float], int | None]:
    """distscale's rule: the scale after every update, and the update with the first min-scale
    event when ``on_min_scale="raise"`` (the sequence stops there, as the peers' runs do)."""
    state, scales = init_state(config), []
    for i, flag in enumerate(flags):
        events = state.num_min_scale_events.item()
        state = update(state, torch.tensor(float(flag)), config)
        if config.on_min_scale == "raise" and state.num_min_scale_events.item() > events:
            return scales, i
        scales.append(state.scale.item())
    return scales, None


def run_facade(scaler: GradScaler, flags: list[bool]) -> tuple[list[float], int | None]:
    """The same through the façade: real backward, inf planted after it, MinScaleError caught."""
    param = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1)
    scales = []
    for i, flag in enumerate(flags):
        opt.zero_grad()
        scaler.scale((param * torch.arange(4.0)).sum()).backward()
        if flag:
            param.grad[1] = INF
        scaler.step(opt)
        try:
            scaler.update()
        except MinScaleError:
            return scales, i
        scales.append(scaler.get_scale())
    return scales, None


def config_of(settings: dict[str, Any]) -> ScalerConfig:
    return ScalerConfig(**{k: v for k, v in settings.items() if k != "enabled"})


# ---------------------------------------------------------------------------- the peers' cases

# (initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis, min_loss_scale, p, mode)
DS_CASES = [
    (16, 1, 1, False, 1, 0.35, "hover"),
    (16, 2, 2, False, 1, 0.3, "hover"),
    (16, 3, 3, False, 1, 0.35, "hover"),
    (16, 2, 2, True, 1, 0.35, "hover"),
    (16, 5, 3, True, 1, 0.25, "hover"),
    (12, 7, 2, False, 1, 0.15, "hover"),
    (14, 1, 3, True, 1, 0.5, "hover"),
    (10, 2, 2, False, 4, 0.55, "storm"),  # the storms reach min_loss_scale: DeepSpeed raises
    (9, 1, 1, False, 2, 0.6, "storm"),
    (12, 3, 3, True, 8, 0.75, "storm"),
    (10, 2, 1, True, 16, 0.6, "storm"),
]
# (initial, min, growth, backoff, interval, hysteresis, p, mode)
MEGATRON_CASES = [
    (2.0**32, 1.0, 2.0, 0.5, 3, 2, 0.35, "hover"),
    (2.0**20, 1.0, 2.0, 0.5, 1, 1, 0.45, "hover"),
    (2.0**16, 1.0, 2.0, 0.5, 2, 3, 0.4, "hover"),
    (2.0**10, 64.0, 2.0, 0.5, 4, 2, 0.6, "storm"),  # clamps at min_scale, keeps skipping
    (1000.0, 3.0, 1.5, 0.75, 2, 2, 0.5, "hover"),  # factors exact in float32: still bitwise
]
STEPS = 400


def ds_section(case: tuple) -> dict[str, Any]:
    power, window, hysteresis, consecutive, min_scale, _, _ = case
    return {
        "initial_scale_power": power,
        "loss_scale_window": window,
        "hysteresis": hysteresis,
        "consecutive_hysteresis": consecutive,
        "min_loss_scale": min_scale,
    }


def ds_args(case: tuple) -> dict[str, Any]:
    power, window, hysteresis, consecutive, min_scale, _, _ = case
    return {
        "init_scale": 2**power,
        "scale_window": window,
        "min_scale": min_scale,
        "delayed_shift": hysteresis,
        "consecutive_hysteresis": consecutive,
    }


def megatron_args(case: tuple) -> dict[str, Any]:
    initial, min_scale, growth, backoff, interval, hysteresis, _, _ = case
    return {
        "initial_scale": initial,
        "min_scale": min_scale,
        "growth_factor": growth,
        "backoff_factor": backoff,
        "growth_interval": interval,
        "hysteresis": hysteresis,
    }


def megatron_kwargs(case: tuple) -> dict[str, Any]:
    initial, min_scale, growth, backoff, interval, hysteresis, _, _ = case
    return {
        "initial_loss_scale": initial,
        "min_loss_scale": min_scale,
        "growth_factor": growth,
        "backoff_factor": backoff,
        "loss_scale_window": interval,
        "hysteresis": hysteresis,
    }


def ds_config(case: tuple) -> ScalerConfig:
    return config_of(presets.deepspeed(ds_section(case)))


def megatron_config(case: tuple) -> ScalerConfig:
    return config_of(presets.megatron(**megatron_kwargs(case)))


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    ds = [(ds_args(c), flags_for(ds_config(c), i, *c[-2:], STEPS)) for i, c in enumerate(DS_CASES)]
    # FP16_Optimizer's dynamic_loss_args: only these three keys are read.
    fp16 = [({k: a[k] for k in ("init_scale", "scale_window", "min_scale")}, f) for a, f in ds]
    mc = [
        (megatron_args(c), flags_for(megatron_config(c), 100 + i, *c[-2:], STEPS))
        for i, c in enumerate(MEGATRON_CASES)
    ]
    (out,) = run_ranks(dc.job_reference_scalers, 1, ds, fp16, mc, timeout=600)
    out["inputs"] = {"deepspeed": ds, "fp16_optimizer": fp16, "megatron": mc}
    return out


def peer(reference: dict[str, Any], name: str) -> list:
    if isinstance(reference[name], dict):
        pytest.skip(reference[name]["skip"])
    return reference[name]


def check_eventful(scales: list[float], start: float, flags: list[bool]) -> tuple[int, int]:
    steps = [start, *scales]
    grew = sum(b > a for a, b in itertools.pairwise(steps))
    backed = sum(b < a for a, b in itertools.pairwise(steps))
    assert max(steps) < F32_TOP, "sequence grows past float32: pick another seed"
    return grew, backed


# ---------------------------------------------------------------------------- DeepSpeed


@pytest.mark.parametrize("index", range(len(DS_CASES)), ids=[str(c[:5]) for c in DS_CASES])
def test_deepspeed_policy_matches_dynamic_loss_scaler(reference, index):
    want_scales, want_raise = peer(reference, "deepspeed")[index]
    flags = reference["inputs"]["deepspeed"][index][1]
    config = ds_config(DS_CASES[index])
    got_scales, got_raise = run_policy(config, flags)
    assert got_raise == want_raise
    for step, (got, want) in enumerate(zip(got_scales, want_scales, strict=True)):
        assert got == want, f"update {step}: distscale {got}, DeepSpeed {want}"
    grew, backed = check_eventful(want_scales, config.init_scale, flags)
    if want_raise is None:
        assert len(want_scales) == STEPS and grew > 5 and backed > 5
    else:
        assert want_raise >= 8 and backed >= 5, "the minimum must be reached after some real updates"


def test_deepspeed_cases_cover_what_they_claim(reference):
    results = peer(reference, "deepspeed")
    raised = [r[1] is not None for r in results]
    assert raised == [c[4] > 1 for c in DS_CASES]
    # Hysteresis-only overflows happen (an overflow that leaves the scale unchanged).
    for case, (_, flags), (scales, _) in zip(
        DS_CASES, reference["inputs"]["deepspeed"], results, strict=True
    ):
        if case[2] > 1:
            before = [2.0 ** case[0], *scales]
            assert any(f and b == a for f, a, b in zip(flags, before, scales, strict=False)), case


@pytest.mark.parametrize("index", [0, 3, 7, 8, 10])
def test_deepspeed_facade_matches_and_raises_at_the_same_update(reference, index):
    want_scales, want_raise = peer(reference, "deepspeed")[index]
    flags = reference["inputs"]["deepspeed"][index][1]
    scaler = GradScaler.from_deepspeed_config({"fp16": ds_section(DS_CASES[index])}, "cpu")
    got_scales, got_raise = run_facade(scaler, flags)
    assert (got_scales, got_raise) == (want_scales, want_raise)
    if want_raise is not None:  # DeepSpeed's run dies there; distscale's state stays usable
        assert scaler.get_scale() == DS_CASES[index][4]


@pytest.mark.parametrize("index", range(len(DS_CASES)))
def test_deepspeed_fp16_optimizer_with_overrides(reference, index):
    want_scales, _ = peer(reference, "fp16_optimizer")[index]
    flags = reference["inputs"]["fp16_optimizer"][index][1]
    settings = {**presets.deepspeed(ds_section(DS_CASES[index])), "hysteresis": 1, "on_min_scale": "clamp"}
    got_scales, got_raise = run_policy(config_of(settings), flags)
    assert got_raise is None
    n = next((i for i, s in enumerate(want_scales) if s >= F32_TOP), len(want_scales))
    assert n > 100, "sequence grows past float32 too early: pick another seed"
    assert got_scales[:n] == want_scales[:n]


def test_deepspeed_defaults_and_whole_config():
    whole = {"train_batch_size": 8, "zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}
    settings = presets.deepspeed(whole)
    assert settings == presets.deepspeed({"enabled": True}) == presets.deepspeed({})
    assert settings == {
        "enabled": True,
        "init_scale": 2.0**16,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 1000,
        "hysteresis": 2,
        "hysteresis_refill": "growth",
        "min_scale": 1.0,
        "on_min_scale": "raise",
        "min_scale_rule": "floor",
        "growth_delay": 1,
    }
    consecutive = presets.deepspeed({"consecutive_hysteresis": True, "min_loss_scale": 4.0})
    assert consecutive["hysteresis_refill"] == "clean_step"
    assert consecutive["min_scale"] == 4.0
    assert not GradScaler.from_deepspeed_config({"fp16": {"enabled": False}}, "cpu").is_enabled()
    clamp = GradScaler.from_deepspeed_config({}, "cpu", on_min_scale="clamp", check_consistency=5)
    assert clamp.config.on_min_scale == "clamp"


def test_deepspeed_growth_timing_counts_from_the_overflow():
    # window 2: the first growth comes at the 3rd clean step (start or after an overflow), then every 2nd.
    scaler_config = config_of(
        presets.deepspeed({"initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 1})
    )
    flags = [False] * 5 + [True] + [False] * 5
    scales, _ = run_policy(scaler_config, flags)
    assert scales == [16, 16, 32, 32, 64, 32, 32, 32, 64, 64, 128]


def test_deepspeed_static_scale_never_changes_but_skips():
    scaler = GradScaler.from_deepspeed_config({"fp16": {"enabled": True, "loss_scale": 128}}, "cpu")
    flags = [True, True, False, False, False, True] + [False] * 10
    scales, raised = run_facade(scaler, flags)
    assert raised is None and scales == [128.0] * len(flags)
    assert scaler.state_dict()["state"]["num_skipped"] == 3


DS_BAD = {
    "unknown-key": ({"fp16": {"loss_scale_windw": 10}}, "loss_scale_windw"),
    "unknown-section-key": ({"train_batch_size": 8}, "train_batch_size"),
    "auto": ({"fp16": {"loss_scale": "auto"}}, "fp16.loss_scale"),
    "section-not-mapping": ({"fp16": True}, "config['fp16']"),
    "negative-loss-scale": ({"loss_scale": -1}, "fp16.loss_scale"),
    "inf-loss-scale": ({"loss_scale": INF}, "fp16.loss_scale"),
    "bool-loss-scale": ({"loss_scale": True}, "fp16.loss_scale"),
    "power-float": ({"initial_scale_power": 16.5}, "fp16.initial_scale_power"),
    "power-too-big": ({"initial_scale_power": 128}, "fp16.initial_scale_power"),
    "window-zero": ({"loss_scale_window": 0}, "fp16.loss_scale_window"),
    "window-str": ({"loss_scale_window": "1000"}, "fp16.loss_scale_window"),
    "hysteresis-zero": ({"hysteresis": 0}, "fp16.hysteresis"),
    "consecutive-int": ({"consecutive_hysteresis": 1}, "fp16.consecutive_hysteresis"),
    "min-fraction": ({"min_loss_scale": 0.5}, "fp16.min_loss_scale"),
    "min-zero": ({"min_loss_scale": 0}, "fp16.min_loss_scale"),
    "min-above-init": ({"initial_scale_power": 2, "min_loss_scale": 8}, "fp16.min_loss_scale"),
    "enabled-str": ({"enabled": "yes"}, "fp16.enabled"),
}


@pytest.mark.parametrize("case", list(DS_BAD))
def test_deepspeed_bad_config_names_the_key(case):
    config, fragment = DS_BAD[case]
    with pytest.raises(ValueError) as info:
        GradScaler.from_deepspeed_config(config, "cpu")
    assert fragment in str(info.value), str(info.value)


def test_deepspeed_static_ignores_dynamic_only_values():
    # DeepSpeed validates the window and the minimum only for dynamic scaling.
    settings = presets.deepspeed({"loss_scale": 8, "loss_scale_window": 0, "min_loss_scale": 0})
    assert (settings["init_scale"], settings["min_scale"], settings["max_scale"]) == (8.0, 8.0, 8.0)


def test_growth_stops_below_float32_inf_where_deepspeed_goes_on():
    # Documented difference: DeepSpeed's Python float reaches 2**128 and beyond; float32 cannot.
    config = config_of(
        presets.deepspeed({"initial_scale_power": 120, "loss_scale_window": 1, "hysteresis": 1})
    )
    scales, _ = run_policy(config, [False] * 20)
    assert scales[-1] == F32_TOP and all(math.isfinite(s) for s in scales)


# ---------------------------------------------------------------------------- Megatron-core


@pytest.mark.parametrize("index", range(len(MEGATRON_CASES)), ids=[str(c[:6]) for c in MEGATRON_CASES])
def test_megatron_matches_dynamic_grad_scaler(reference, index):
    want_scales, _ = peer(reference, "megatron")[index]
    flags = reference["inputs"]["megatron"][index][1]
    config = megatron_config(MEGATRON_CASES[index])
    got_scales, got_raise = run_policy(config, flags)
    assert got_raise is None
    assert got_scales == want_scales
    grew, backed = check_eventful(want_scales, config.init_scale, flags)
    assert grew > 5 and backed > 5
    if MEGATRON_CASES[index][-1] == "storm":  # clamped at the minimum, several times
        assert want_scales.count(config.min_scale) > 5


# Rows: (found, scale after), written out from Megatron's update(): hysteresis 2, interval 2,
# init 64, min 16. The hysteresis is cumulative: a clean step in between does not refill it.
MEGATRON_ROWS = [
    ("F", 64.0),  # one unit spent
    ("C", 64.0),
    ("F", 32.0),  # second overflow since the last growth backs off, although not consecutive
    ("F", 16.0),
    ("F", 16.0),  # clamped at min, no error
    ("C", 16.0),
    ("C", 32.0),  # growth refills
    ("F", 32.0),
    ("C", 32.0),
    ("C", 64.0),  # growth after 2 clean steps: no DeepSpeed-style delay
]


def test_megatron_by_hand():
    scaler = GradScaler.from_megatron(
        "cpu", initial_loss_scale=64.0, min_loss_scale=16.0, loss_scale_window=2, hysteresis=2
    )
    scales, raised = run_facade(scaler, [kind == "F" for kind, _ in MEGATRON_ROWS])
    assert raised is None
    assert scales == [scale for _, scale in MEGATRON_ROWS]


def test_megatron_defaults_and_static():
    settings = presets.megatron()
    assert (settings["init_scale"], settings["min_scale"], settings["growth_interval"]) == (
        2.0**32,
        1.0,
        1000,
    )
    assert (settings["hysteresis"], settings["hysteresis_refill"], settings["on_min_scale"]) == (
        2,
        "growth",
        "clamp",
    )
    scaler = GradScaler.from_megatron("cpu", loss_scale=4096.0)
    scales, _ = run_facade(scaler, [True, False, True, True] + [False] * 5)
    assert scales == [4096.0] * 9
    assert GradScaler.from_megatron("cpu", loss_scale=0).config == GradScaler.from_megatron("cpu").config
    with pytest.raises(ValueError, match="loss_scale"):
        GradScaler.from_megatron("cpu", loss_scale=-1.0)
    with pytest.raises(ValueError, match="hysteresis"):
        GradScaler.from_megatron("cpu", hysteresis=0)


# ---------------------------------------------------------------------------- fairseq


class FairseqRule:
    """fairseq's DynamicLossScaler (fairseq/optim/dynamic_loss_scaler.py), restated.

    ``step(overflow)`` is one training step: fairseq's ``check_overflow`` on an overflow (which
    raises OverflowError, or FloatingPointError at the minimum) or ``update`` after a clean
    step. Returns True where fairseq raises FloatingPointError (its run ends there).
    """

    def __init__(self, init_scale, scale_factor, scale_window, tolerance, threshold, min_loss_scale):
        self.scale, self.factor, self.window = init_scale, scale_factor, scale_window
        self.tolerance, self.threshold, self.min_loss_scale = tolerance, threshold, min_loss_scale
        self.iteration = 0
        self.last_overflow = self.last_rescale = -1
        self.overflows = 0  # since the last decrease (a growth leaves it alone)

    def step(self, overflow: bool) -> bool:
        if not overflow:
            if (self.iteration - self.last_overflow) % self.window == 0:
                self.scale *= self.factor
                self.last_rescale = self.iteration
            self.iteration += 1
            return False
        kept = self.scale
        self.overflows += 1
        fraction = self.overflows / float(self.iteration - self.last_rescale)
        self.last_overflow = self.iteration
        if fraction >= self.tolerance:
            self.scale /= self.factor
            if self.threshold is not None:
                self.scale = max(self.scale, self.threshold)
            self.last_rescale, self.overflows = self.iteration, 0
        if self.scale <= self.min_loss_scale:
            self.scale = kept
            return True
        self.iteration += 1
        return False


def run_fairseq(args: dict[str, Any], flags: list[bool]) -> tuple[list[float], int | None]:
    rule, scales = FairseqRule(**args), []
    for i, flag in enumerate(flags):
        if rule.step(flag):
            return scales, i
        scales.append(rule.scale)
    return scales, None


# (init_scale, scale_factor, scale_window, tolerance, threshold, min_loss_scale, p, mode)
FAIRSEQ_CASES = [
    (128.0, 2.0, 2, 0.0, None, 1e-4, 0.3, "hover"),
    (2.0**15, 2.0, 3, 0.25, None, 1e-4, 0.45, "hover"),
    (2.0**10, 2.0, 5, 0.5, None, 1e-4, 0.55, "hover"),
    (2.0**10, 2.0, 2, 1.0, None, 1e-4, 0.7, "hover"),
    (16.0, 2.0, 4, 0.0, 2.0, 1e-4, 0.5, "storm"),  # threshold above the minimum: clamp, never raises
    (2.0**10, 2.0, 3, 0.0, None, 0.5, 0.6, "storm"),  # these three raise at the minimum
    (2.0**12, 4.0, 2, 0.2, None, 0.01, 0.65, "storm"),
    (2.0**10, 2.0, 3, 0.3, 0.25, 1.0, 0.7, "storm"),  # threshold below the minimum: the minimum decides
]


def fairseq_args(case: tuple) -> dict[str, Any]:
    keys = ("init_scale", "scale_factor", "scale_window", "tolerance", "threshold", "min_loss_scale")
    return dict(zip(keys, case[:6], strict=True))


@pytest.mark.parametrize("index", range(len(FAIRSEQ_CASES)), ids=[str(c[:6]) for c in FAIRSEQ_CASES])
def test_fairseq_policy_and_facade_match(index):
    case = FAIRSEQ_CASES[index]
    settings = presets.fairseq(**fairseq_args(case))
    flags = flags_for(config_of(settings), 200 + index, *case[-2:], STEPS)
    want_scales, want_raise = run_fairseq(fairseq_args(case), flags)
    assert run_policy(config_of(settings), flags) == (want_scales, want_raise)
    assert run_facade(GradScaler.from_fairseq("cpu", **fairseq_args(case)), flags) == (
        want_scales,
        want_raise,
    )
    grew, backed = check_eventful(want_scales, case[0], flags)
    assert (want_raise is not None) == (index in (5, 6, 7))
    if want_raise is None:
        assert grew > 5 and backed > 5
    else:
        assert want_raise >= 8 and backed >= 5


def test_fairseq_tolerance_skips_backoffs():
    # tolerance 0.5: an overflow backs off only when overflows since the last decrease are at
    # least half of the steps since the last rescale. Rows written out from fairseq's rule.
    scaler = GradScaler.from_fairseq("cpu", init_scale=64.0, scale_window=100, tolerance=0.5)
    rows = [  # (found, scale after): steps since rescale count from the start (iteration -1)
        ("F", 32.0),  # 1/1 >= 0.5
        ("C", 32.0),
        ("C", 32.0),
        ("F", 32.0),  # 1/3 < 0.5: tolerated (growth count restarts anyway)
        ("F", 16.0),  # 2/4 >= 0.5
        ("C", 16.0),
        ("F", 8.0),  # 1/2 >= 0.5
    ]
    scales, _ = run_facade(scaler, [kind == "F" for kind, _ in rows])
    assert scales == [scale for _, scale in rows]
    state = scaler.state_dict()["state"]
    assert (state["steps_since_rescale"], state["overflows_since_backoff"]) == (0, 0)


def test_fairseq_min_loss_scale_keeps_the_scale_and_raises():
    scaler = GradScaler.from_fairseq("cpu", init_scale=4.0, scale_window=100, min_loss_scale=1.0)
    scales, raised = run_facade(scaler, [True, True, False])
    assert (scales, raised) == ([2.0], 1)  # 2 -> 1 would reach the minimum: kept at 2
    assert scaler.get_scale() == 2.0


def test_fairseq_defaults_and_window():
    settings = presets.fairseq()
    assert settings["init_scale"] == 128.0 and settings["growth_interval"] == 2**14
    assert (settings["min_scale"], settings["min_scale_rule"], settings["on_min_scale"]) == (
        1e-4,
        "refuse",
        "raise",
    )
    assert presets.fairseq(data_parallel_size=8, update_freq=4)["growth_interval"] == 512
    assert presets.fairseq(data_parallel_size=3)["growth_interval"] == int(2**14 / 3)
    assert GradScaler.from_fairseq("cpu").get_growth_interval() == 2**14  # not distributed: 1 rank
    threshold = presets.fairseq(threshold=0.5)
    assert (threshold["min_scale"], threshold["min_scale_rule"], threshold["on_min_scale"]) == (
        0.5,
        "floor",
        "clamp",
    )
    with pytest.raises(ValueError, match="scale_window"):
        presets.fairseq(data_parallel_size=2**15)
    with pytest.raises(ValueError, match="threshold"):
        presets.fairseq(init_scale=1.0, threshold=2.0)
    with pytest.raises(ValueError, match="scale_factor"):
        presets.fairseq(scale_factor=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        GradScaler.from_fairseq("cpu", tolerance=-0.1)
    with pytest.raises(ValueError, match=r"tolerance.*hysteresis"):
        GradScaler.from_fairseq("cpu", tolerance=0.2, hysteresis=2)


# ---------------------------------------------------------------------------- the rule's new settings

NEW_BAD = {
    "growth-delay-negative": ({"growth_delay": -1}, ValueError, "growth_delay"),
    "growth-delay-float": ({"growth_delay": 1.5}, TypeError, "growth_delay"),
    "growth-delay-bool": ({"growth_delay": True}, TypeError, "growth_delay"),
    "tolerance-negative": ({"tolerance": -0.1}, ValueError, "tolerance"),
    "tolerance-inf": ({"tolerance": INF}, ValueError, "tolerance"),
    "tolerance-str": ({"tolerance": "0.1"}, TypeError, "tolerance"),
    "tolerance-with-hysteresis": ({"tolerance": 0.1, "hysteresis": 2}, ValueError, "hysteresis"),
    "min-scale-rule": ({"min_scale_rule": "bounce"}, ValueError, "min_scale_rule"),
}


@pytest.mark.parametrize("case", list(NEW_BAD))
def test_new_settings_are_validated(case):
    kwargs, exc, fragment = NEW_BAD[case]
    for build in (lambda: ScalerConfig(**kwargs), lambda: GradScaler("cpu", **kwargs)):
        with pytest.raises(exc) as info:
            build()
        assert fragment in str(info.value), str(info.value)


def test_growth_delay_two_by_hand():
    config = ScalerConfig(init_scale=8.0, growth_interval=2, growth_delay=2)
    assert init_state(config).growth_tracker.item() == -2
    # 4 clean steps to the first growth (2 + 2), then every 2; an overflow restarts at -2.
    flags = [False] * 6 + [True] + [False] * 4
    scales, _ = run_policy(config, flags)
    assert scales == [8, 8, 8, 16, 16, 32, 16, 16, 16, 16, 32]


def test_refuse_rule_by_hand_and_without_raise():
    config = ScalerConfig(init_scale=8.0, growth_interval=100, min_scale=2.0, min_scale_rule="refuse")
    state = init_state(config)
    rows = [(True, 4.0, 0), (True, 4.0, 1), (True, 4.0, 2), (False, 4.0, 2)]  # 4 -> 2 would reach the floor
    for step, (flag, scale, events) in enumerate(rows):
        state = update(state, torch.tensor(float(flag)), config)
        assert (state.scale.item(), state.num_min_scale_events.item()) == (scale, events), step
    # With on_min_scale="warn" the façade warns and keeps the scale.
    scaler = GradScaler("cpu", init_scale=4.0, min_scale=2.0, min_scale_rule="refuse", on_min_scale="warn")
    with pytest.warns(RuntimeWarning, match="would have brought the loss scale"):
        scales, raised = run_facade(scaler, [True])
    assert (scales, raised) == ([4.0], None)


def test_new_settings_keep_update_free_of_host_syncs():
    from distscale.testing import count_host_syncs

    config = ScalerConfig(
        init_scale=64.0, tolerance=0.3, growth_delay=1, min_scale=1.0, min_scale_rule="refuse"
    )
    state = init_state(config)
    with count_host_syncs() as counts:
        for flag in (1.0, 0.0, 1.0, 1.0, 0.0):
            state = update(state, torch.tensor(flag), config)
    assert sum(counts.values()) == 0


def test_torch_format_growth_tracker_may_be_minus_growth_delay():
    torch_state = torch.amp.GradScaler("cpu").state_dict()
    scaler = GradScaler.from_deepspeed_config({}, "cpu")
    scaler.load_state_dict({**torch_state, "_growth_tracker": -1})
    assert scaler.state_dict()["state"]["growth_tracker"] == -1
    with pytest.raises(ValueError, match="growth_tracker"):
        scaler.load_state_dict({**torch_state, "_growth_tracker": -2})
