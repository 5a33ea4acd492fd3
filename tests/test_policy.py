"""The pure loss-scale rule (distscale.policy.update) against torch's kernel and the documented rule."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from distscale import ScalerConfig
from distscale.policy import STATE_DTYPES, ScaleState, init_state, update
from distscale.testing import SYNC_METHODS, count_host_syncs

INF = float("inf")


def flag(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def snapshot(state: ScaleState) -> dict[str, float | int]:
    return {name: t.item() for name, t in zip(ScaleState._fields, state, strict=True)}


# ---------------------------------------------------------------------------- purity and dtypes


def test_update_is_pure():
    config = ScalerConfig(init_scale=1024.0, growth_interval=2, hysteresis=2)
    state = init_state(config)
    for value in (0.0, 1.0, 0.0, 0.0, 2.0, 1.0):
        found_inf = flag(value)
        before = [t.clone() for t in state]
        found_before = found_inf.clone()
        new = update(state, found_inf, config)
        for old_t, saved in zip(state, before, strict=True):
            assert torch.equal(old_t, saved)
        assert torch.equal(found_inf, found_before)
        # New tensors, never views of the inputs: the caller copies them into its buffers.
        for old_t, new_t in zip(state, new, strict=True):
            assert new_t is not old_t
            assert new_t.data_ptr() != old_t.data_ptr()
        # Same inputs, same outputs.
        again = update(state, found_inf, config)
        for a, b in zip(new, again, strict=True):
            assert torch.equal(a, b)
        state = new


def test_state_dtypes_and_shapes_are_kept():
    config = ScalerConfig(init_scale=3.0, growth_interval=1, hysteresis=3, min_scale=1.0, max_scale=100.0)
    state = init_state(config)
    for value in (0.0, 1.0, 3.0, 0.0):
        state = update(state, flag(value), config)
        for name, tensor in zip(ScaleState._fields, state, strict=True):
            assert tensor.dtype == STATE_DTYPES[name], name
            assert tensor.shape == (), name


def test_init_state():
    config = ScalerConfig(init_scale=1000.3, hysteresis=4)
    state = init_state(config)
    assert state.scale.item() == torch.tensor(1000.3, dtype=torch.float32).item()
    assert snapshot(state) | {"scale": 0} == {
        "scale": 0,
        "growth_tracker": 0,
        "hysteresis_tracker": 4,
        "num_updates": 0,
        "num_skipped": 0,
        "num_min_scale_events": 0,
        "steps_since_rescale": 0,
        "overflows_since_backoff": 0,
        "calibrated": 0,
        "amax_window": 0.0,
    }


# ------------------------------------------------------------------------- torch's kernel, bitwise

TORCH_CONFIGS = [
    # (init_scale, growth_factor, backoff_factor, growth_interval, p_overflow)
    (2.0**16, 2.0, 0.5, 1, 0.5),
    (2.0**16, 2.0, 0.5, 2, 0.35),
    (2.0**16, 2.0, 0.5, 3, 0.25),
    (1000.3, 1.7, 0.3, 1, 0.3),
    (1000.3, 1.7, 0.3, 2, 0.2),
    (3.14159, 1.7, 0.3, 3, 0.15),
    (12345.678, 1.1, 0.9, 2, 0.5),
    (0.0123, 3.0, 0.125, 1, 0.35),
    (7.0, 1.0001, 0.99, 3, 0.3),
]


@pytest.mark.parametrize("refill", ["growth", "clean_step"])
@pytest.mark.parametrize(
    ("init_scale", "growth", "backoff", "interval", "p_overflow"),
    TORCH_CONFIGS,
    ids=[f"s{c[0]}-g{c[1]}-b{c[2]}-i{c[3]}" for c in TORCH_CONFIGS],
)
def test_matches_torch_amp_update_scale_bitwise(init_scale, growth, backoff, interval, p_overflow, refill):
    config = ScalerConfig(
        init_scale=init_scale,
        growth_factor=growth,
        backoff_factor=backoff,
        growth_interval=interval,
        hysteresis_refill=refill,
    )
    state = init_state(config)
    torch_scale = torch.full((), init_scale, dtype=torch.float32)
    torch_tracker = torch.zeros((), dtype=torch.int32)
    gen = torch.Generator().manual_seed(int(init_scale * 1000) % 9973 + interval)
    # Overflow flags as update() sees them: 0, 1, or a sum of several optimizers' flags (2, 3).
    overflow = torch.rand(400, generator=gen) < p_overflow
    multiplicity = torch.randint(1, 4, (400,), generator=gen)
    flags = torch.where(overflow, multiplicity, 0).float()
    grew = backed_off = 0
    for step, value in enumerate(flags.tolist()):
        previous = torch_scale.clone()
        torch._amp_update_scale_(torch_scale, torch_tracker, flag(value), growth, backoff, interval)
        state = update(state, flag(value), config)
        assert torch.equal(state.scale, torch_scale), (step, state.scale.item(), torch_scale.item())
        assert torch.equal(state.growth_tracker, torch_tracker), step
        grew += int(torch_scale.item() > previous.item())
        backed_off += int(torch_scale.item() < previous.item())
    assert grew > 5 and backed_off > 5, "sequence too uneventful to test anything"
    assert state.num_updates.item() == 400
    assert state.num_skipped.item() == int(overflow.sum())
    assert state.num_min_scale_events.item() == 0


@pytest.mark.parametrize(("growth", "init_scale"), [(2.0, 2.0**127), (1.7, 2.0**127), (3.0, 2.0**126)])
def test_growth_never_produces_inf(growth, init_scale):
    config = ScalerConfig(init_scale=init_scale, growth_factor=growth, growth_interval=1)
    state = init_state(config)
    torch_scale = torch.full((), init_scale, dtype=torch.float32)
    torch_tracker = torch.zeros((), dtype=torch.int32)
    for _ in range(5):
        torch._amp_update_scale_(torch_scale, torch_tracker, flag(0.0), growth, 0.5, 1)
        state = update(state, flag(0.0), config)
        assert torch.isfinite(state.scale)
        assert torch.equal(state.scale, torch_scale)
        assert state.growth_tracker.item() == 0
    # The scale stopped at the largest finite value reachable: one more growth would be inf.
    assert not torch.isfinite((state.scale.double() * growth).float())
    # A backoff from there is still an ordinary backoff.
    backed = update(state, flag(1.0), config)
    assert backed.scale.item() == (state.scale.double() * 0.5).float().item()


def test_overflow_flags_above_one_are_overflows():
    config = ScalerConfig(init_scale=64.0, growth_interval=1)
    base = init_state(config)
    for value in (0.5, 1.0, 2.0, 3.0, 17.0):
        new = update(base, flag(value), config)
        assert new.scale.item() == 32.0, value
        assert new.growth_tracker.item() == 0
        assert new.num_skipped.item() == 1
    clean = update(base, flag(0.0), config)
    assert clean.scale.item() == 128.0
    assert clean.num_skipped.item() == 0


# ------------------------------------------------------------------------- hysteresis, by hand
# Each row: (found_inf, scale, growth_tracker, hysteresis_tracker) *after* that update, written
# out from the rule in policy.py's docstring. "F" = overflow, "C" = clean step.

HYST2_GROWTH = [  # hysteresis=2, refill="growth", growth_interval=2, start (64, 0, 2)
    ("F", 64.0, 0, 1),  # first overflow spends one unit, no backoff
    ("C", 64.0, 1, 1),  # a clean step does not refill under "growth"
    ("F", 32.0, 0, 0),  # hysteresis spent: back off
    ("F", 16.0, 0, 0),  # still spent: back off again
    ("C", 16.0, 1, 0),
    ("C", 32.0, 0, 2),  # growth refills
    ("F", 32.0, 0, 1),
    ("C", 32.0, 1, 1),
    ("C", 64.0, 0, 2),
    ("F", 64.0, 0, 1),
    ("F", 32.0, 0, 0),
]

HYST2_CLEAN = [  # hysteresis=2, refill="clean_step", growth_interval=2, start (64, 0, 2)
    ("F", 64.0, 0, 1),
    ("C", 64.0, 1, 2),  # every clean step refills
    ("F", 64.0, 0, 1),  # so this overflow is tolerated again
    ("F", 32.0, 0, 0),
    ("C", 32.0, 1, 2),
    ("C", 64.0, 0, 2),
    ("F", 64.0, 0, 1),
    ("F", 32.0, 0, 0),
    ("F", 16.0, 0, 0),
    ("C", 16.0, 1, 2),
    ("F", 16.0, 0, 1),
]

HYST3_GROWTH = [  # hysteresis=3, refill="growth", growth_interval=3, start (64, 0, 3)
    ("F", 64.0, 0, 2),
    ("F", 64.0, 0, 1),
    ("C", 64.0, 1, 1),
    ("F", 32.0, 0, 0),
    ("C", 32.0, 1, 0),
    ("C", 32.0, 2, 0),
    ("C", 64.0, 0, 3),
    ("F", 64.0, 0, 2),
    ("C", 64.0, 1, 2),
    ("F", 64.0, 0, 1),
    ("F", 32.0, 0, 0),
    ("F", 16.0, 0, 0),
]

HYST3_CLEAN = [  # hysteresis=3, refill="clean_step", growth_interval=3, start (64, 0, 3)
    ("F", 64.0, 0, 2),
    ("F", 64.0, 0, 1),
    ("C", 64.0, 1, 3),
    ("F", 64.0, 0, 2),
    ("F", 64.0, 0, 1),
    ("F", 32.0, 0, 0),
    ("C", 32.0, 1, 3),
    ("C", 32.0, 2, 3),
    ("C", 64.0, 0, 3),
    ("F", 64.0, 0, 2),
]


@pytest.mark.parametrize(
    ("hysteresis", "refill", "interval", "rows"),
    [
        (2, "growth", 2, HYST2_GROWTH),
        (2, "clean_step", 2, HYST2_CLEAN),
        (3, "growth", 3, HYST3_GROWTH),
        (3, "clean_step", 3, HYST3_CLEAN),
    ],
    ids=["h2-growth", "h2-clean_step", "h3-growth", "h3-clean_step"],
)
def test_hysteresis_by_hand(hysteresis, refill, interval, rows):
    config = ScalerConfig(
        init_scale=64.0,
        growth_interval=interval,
        hysteresis=hysteresis,
        hysteresis_refill=refill,
    )
    state = init_state(config)
    assert (state.hysteresis_tracker.item(), state.growth_tracker.item()) == (hysteresis, 0)
    skipped = 0
    for step, (kind, scale, growth_tracker, hysteresis_tracker) in enumerate(rows, start=1):
        skipped += kind == "F"
        state = update(state, flag(1.0 if kind == "F" else 0.0), config)
        got = (state.scale.item(), state.growth_tracker.item(), state.hysteresis_tracker.item())
        assert got == (scale, growth_tracker, hysteresis_tracker), f"step {step} ({kind})"
        assert state.num_updates.item() == step
        assert state.num_skipped.item() == skipped
        assert state.num_min_scale_events.item() == 0


def test_hysteresis_one_ignores_refill_mode():
    a = ScalerConfig(init_scale=100.0, growth_interval=2, hysteresis_refill="growth")
    b = ScalerConfig(init_scale=100.0, growth_interval=2, hysteresis_refill="clean_step")
    sa, sb = init_state(a), init_state(b)
    for value in (1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1):
        sa, sb = update(sa, flag(value), a), update(sb, flag(value), b)
        assert torch.equal(sa.scale, sb.scale)
        assert torch.equal(sa.growth_tracker, sb.growth_tracker)


# ----------------------------------------------------------------------------------- bounds


def test_min_scale_clamps_and_counts_events():
    config = ScalerConfig(init_scale=8.0, backoff_factor=0.5, growth_interval=100, min_scale=3.0)
    state = init_state(config)
    # 8 -> 4 -> max(2, 3) = 3: two backoffs, neither *found* the scale at min_scale.
    expected = [(4.0, 0), (3.0, 0), (3.0, 1), (3.0, 2), (3.0, 3)]
    for step, (scale, events) in enumerate(expected, start=1):
        state = update(state, flag(1.0), config)
        assert state.scale.item() == scale, step
        assert state.num_min_scale_events.item() == events, step
        assert state.scale.item() >= config.min_scale
    # Clean steps do not count events; the scale can grow away from the floor again.
    state = update(state, flag(0.0), config)
    assert state.num_min_scale_events.item() == 3
    assert state.num_skipped.item() == 5


def test_min_scale_never_crossed_on_random_sequences():
    config = ScalerConfig(init_scale=2.0**10, backoff_factor=0.3, growth_interval=3, min_scale=5.0)
    state = init_state(config)
    gen = torch.Generator().manual_seed(3)
    events = 0
    for value in (torch.rand(300, generator=gen) < 0.6).float().tolist():
        at_floor = state.scale.item() <= config.min_scale
        state = update(state, flag(value), config)
        events += int(value > 0 and at_floor)
        assert state.scale.item() >= config.min_scale
    assert events > 0
    assert state.num_min_scale_events.item() == events


def test_min_scale_events_only_when_a_backoff_happens():
    # With hysteresis, an overflow that only spends a unit does not back off, so it is no event.
    config = ScalerConfig(
        init_scale=2.0, min_scale=2.0, hysteresis=2, hysteresis_refill="clean_step", growth_interval=100
    )
    state = init_state(config)
    rows = [  # (found, scale, hysteresis_tracker, events)
        ("F", 2.0, 1, 0),  # unit spent, no backoff
        ("F", 2.0, 0, 1),  # backoff found the scale at the floor
        ("C", 2.0, 2, 1),  # refill
        ("F", 2.0, 1, 1),
        ("F", 2.0, 0, 2),
        ("F", 2.0, 0, 3),
    ]
    for step, (kind, scale, hyst, events) in enumerate(rows, start=1):
        state = update(state, flag(1.0 if kind == "F" else 0.0), config)
        assert state.scale.item() == scale, step
        assert state.hysteresis_tracker.item() == hyst, step
        assert state.num_min_scale_events.item() == events, step


def test_no_min_scale_means_no_floor_and_no_events():
    config = ScalerConfig(init_scale=1.0, backoff_factor=0.5, growth_interval=100)
    state = init_state(config)
    for _ in range(10):
        state = update(state, flag(1.0), config)
    assert state.scale.item() == 2.0**-10
    assert state.num_min_scale_events.item() == 0


def test_max_scale_caps_growth():
    config = ScalerConfig(init_scale=8.0, growth_factor=2.0, growth_interval=1, max_scale=20.0)
    state = init_state(config)
    expected = [16.0, 20.0, 20.0, 20.0]
    for step, scale in enumerate(expected, start=1):
        state = update(state, flag(0.0), config)
        assert state.scale.item() == scale, step
        assert state.growth_tracker.item() == 0
    state = update(state, flag(1.0), config)
    assert state.scale.item() == 10.0
    state = update(state, flag(0.0), config)
    assert state.scale.item() == 20.0


def test_max_scale_on_random_sequences():
    config = ScalerConfig(
        init_scale=3.0, growth_factor=1.7, backoff_factor=0.6, growth_interval=1, max_scale=50.0
    )
    state = init_state(config)
    gen = torch.Generator().manual_seed(5)
    hit = 0
    for value in (torch.rand(300, generator=gen) < 0.2).float().tolist():
        state = update(state, flag(value), config)
        assert state.scale.item() <= 50.0
        hit += state.scale.item() == 50.0
    assert hit > 0


# --------------------------------------------------------------------------------- counters


def test_counters():
    config = ScalerConfig(init_scale=16.0, growth_interval=2)
    state = init_state(config)
    flags = [0, 1, 0, 0, 2, 1, 0, 3, 0, 0, 0]
    for step, value in enumerate(flags, start=1):
        state = update(state, flag(value), config)
        assert state.num_updates.item() == step
        assert state.num_skipped.item() == sum(1 for v in flags[:step] if v > 0)


# ------------------------------------------------------------------------------- host syncs


def test_sync_counter_sees_syncs():
    # Guard for the check below: the counter must notice each kind of host read.
    t = torch.tensor(1.0)
    with count_host_syncs() as counts:
        t.item()
        bool(t)
        t.tolist()
        float(t)
        int(t)
    assert counts == Counter(dict.fromkeys(SYNC_METHODS, 1))


def test_sync_counter_restores_tensor_methods():
    before = {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS}
    with count_host_syncs():
        assert all(torch.Tensor.__dict__.get(name) is not before[name] for name in SYNC_METHODS)
    assert {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS} == before


@pytest.mark.parametrize(
    "config",
    [
        ScalerConfig(),
        ScalerConfig(init_scale=4.0, growth_interval=1, hysteresis=3, hysteresis_refill="clean_step"),
        ScalerConfig(init_scale=4.0, growth_interval=2, min_scale=1.0, max_scale=64.0, on_min_scale="raise"),
    ],
    ids=["default", "hysteresis", "bounds"],
)
def test_update_never_syncs(config):
    state = init_state(config)
    flags = [flag(v) for v in (0, 1, 0, 0, 2, 1, 1, 1, 0)]
    with count_host_syncs() as counts:
        for found_inf in flags:
            state = update(state, found_inf, config)
    assert sum(counts.values()) == 0, dict(counts)
    assert state.num_updates.item() == len(flags)


# ---------------------------------------------------------------------------- the amax rule


def _amax_run(config: ScalerConfig, steps: list[tuple[float, float | None]]) -> list[dict]:
    """(found_inf, amax) per step -> the state after each update."""
    state, out = init_state(config), []
    for found, amax in steps:
        state = update(state, flag(found), config, None if amax is None else torch.tensor(amax))
        out.append(snapshot(state))
    return out


def test_amax_rule_calibrates_at_the_first_clean_step_to_a_power_of_two_below_the_margin():
    config = ScalerConfig(rule="amax", init_scale=2.0**16, amax_margin=2.0**8, growth_interval=1000)
    # Step 0 overflows (backoff as torch); step 1 is clean with amax 3 at scale 2^15.
    got = _amax_run(config, [(1.0, float("nan")), (0.0, 3.0), (0.0, 3.0)])
    assert got[0]["scale"] == 2.0**15 and got[0]["calibrated"] == 0
    # 2^15 * 65504 / (3 * 256) = 2.79e6 -> 2^21: the largest scaled gradient keeps 256x headroom.
    assert got[1]["scale"] == 2.0**21 and got[1]["calibrated"] == 1 and got[1]["growth_tracker"] == 0
    assert got[2]["scale"] == 2.0**21  # calibrated once; later steps grow only by the rule below


def test_amax_rule_grows_only_after_an_interval_that_all_left_the_headroom_and_as_far_as_it_allows():
    config = ScalerConfig(rule="amax", init_scale=1024.0, amax_margin=16.0, growth_interval=2)
    steps = [(0.0, 2.0)]  # calibrates: 1024 * 65504 / (2 * 16) = 2.096e6 -> 2^20
    steps += [(0.0, 3000.0), (0.0, 3000.0)]  # due, 3000 * 2 * 16 = 96000 > 65504: refused, a new interval
    steps += [(0.0, 1000.0), (0.0, 800.0)]  # due, the interval's peak 1000 fits (3000 no longer counts)
    steps += [(1.0, float("nan"))]  # backoff: a new scale, an empty window
    steps += [(0.0, 100.0), (0.0, 50.0)]  # due, peak 100: the scale comes back, and further
    got = _amax_run(config, steps)
    # 2^20 * 65504 / (1000 * 16) = 2^20 * 4.09 -> 2^22; 2^21 * 65504 / (100 * 16) = 2^21 * 40.9 -> 2^26.
    assert [g["scale"] for g in got] == [2.0**20] * 4 + [2.0**22, 2.0**21, 2.0**21, 2.0**26]
    assert [g["amax_window"] for g in got] == [0.0, 3000.0, 0.0, 1000.0, 0.0, 0.0, 100.0, 0.0]
    assert [g["growth_tracker"] for g in got] == [0, 1, 0, 1, 0, 0, 1, 0]


def test_amax_rule_grows_by_the_growth_factor_when_the_window_holds_only_zeros():
    # All-zero gradients say nothing about the headroom: no jump to float32's largest power of two.
    config = ScalerConfig(rule="amax", init_scale=1024.0, growth_interval=2, max_scale=2.0**40)
    got = _amax_run(config, [(0.0, 0.0)] * 4)
    assert [g["scale"] for g in got] == [1024.0, 2048.0, 2048.0, 4096.0]
    assert all(g["calibrated"] == 0 for g in got)  # a zero amax does not calibrate either


def test_amax_rule_never_grows_or_calibrates_blind_and_backs_off_as_torch():
    config = ScalerConfig(rule="amax", init_scale=1024.0, growth_interval=1, hysteresis=2)
    got = _amax_run(config, [(0.0, None), (0.0, float("inf")), (0.0, None), (1.0, 5.0), (1.0, 5.0)])
    assert [g["scale"] for g in got] == [1024.0, 1024.0, 1024.0, 1024.0, 512.0]  # hysteresis 2
    assert all(g["calibrated"] == 0 for g in got)


def test_amax_rule_respects_the_bounds():
    config = ScalerConfig(rule="amax", init_scale=4.0, min_scale=2.0, max_scale=2.0**10, growth_interval=1)
    assert _amax_run(config, [(0.0, 1e-6)])[0]["scale"] == 2.0**10  # calibration clamped to max_scale
    config = ScalerConfig(rule="amax", init_scale=4.0, min_scale=2.0, growth_interval=1)
    assert _amax_run(config, [(0.0, 1e6)])[0]["scale"] == 2.0  # and to min_scale


def test_pow2_floor_reads_the_exponent_bits():
    from distscale.policy import pow2_floor

    x = torch.tensor([1.0, 1.5, 2.0, 3.999, 2.0**-100, 1e300], dtype=torch.float64)
    assert pow2_floor(x).tolist() == [1.0, 1.0, 2.0, 2.0, 2.0**-100, 2.0 ** math.floor(math.log2(1e300))]


def test_the_torch_rule_ignores_amax():
    config = ScalerConfig(init_scale=1024.0, growth_interval=1)
    plain, with_amax = init_state(config), init_state(config)
    for found in (0.0, 1.0, 0.0):
        plain = update(plain, flag(found), config)
        with_amax = update(with_amax, flag(found), config, torch.tensor(1e-3))
        assert snapshot(plain) == snapshot(with_amax)
