"""The skip rules and fault attribution on one process: settings, the pure decision, held steps,
counters and reasons, checkpoints. Real ranks: tests/test_rules_distributed.py."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

import distscale
from distscale import policy, rules
from distscale.config import ScalerConfig
from distscale.errors import FaultError
from tests import tiny

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip_grad_norm_above": -1.0}, r"skip_grad_norm_above must be None or finite and > 0, got -1.0"),
        ({"skip_grad_norm_sigma": 0.0}, r"skip_grad_norm_sigma must be None or finite and > 0, got 0.0"),
        ({"skip_loss_sigma": -3}, r"skip_loss_sigma must be None or finite and > 0, got -3"),
        ({"skip_grad_norm_ratio": 1.0}, r"skip_grad_norm_ratio must be None or finite and > 1, got 1.0"),
        ({"skip_loss_above": INF}, r"skip_loss_above must be finite, got inf"),
        ({"spike_window": 1}, r"spike_window must be >= 2 .*got 1"),
        ({"spike_warmup": -1}, r"spike_warmup must be >= 0, got -1"),
        (
            {"on_fault": "ignore"},
            r"on_fault must be None or one of \('warn', 'raise', 'skip'\), got 'ignore'",
        ),
        ({"fault_repeats": 0}, r"fault_repeats must be >= 1, got 0"),
    ],
)
def test_bad_settings_fail_at_construction_naming_argument_and_value(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        distscale.GradScaler("cpu", **kwargs)


def test_types_are_checked() -> None:
    with pytest.raises(TypeError, match=r"spike_window must be an int, got float 2\.5"):
        ScalerConfig(spike_window=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="skip_loss_sigma must be a real number, got str"):
        ScalerConfig(skip_loss_sigma="6")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the pure decision


def _inputs(norm: float, loss: float | None = None, overflow: bool = False, bad_ranks: list[int] = ()):
    count = 0.0 if loss is None else 1.0
    finite = loss is not None and math.isfinite(loss)
    sums = torch.tensor(
        [
            float(len(bad_ranks)),
            float(sum(r + 1 for r in bad_ranks)),
            loss if finite else 0.0,
            count,
            float(loss is not None and not finite),
            float(loss is not None and not finite),
        ]
    )
    return rules.job_inputs(torch.tensor(float(overflow)), torch.tensor(norm), sums)


def _feed(config: ScalerConfig, values: list[float], scale: float = 1024.0):
    """Decide and advance over ``values`` (norms); return the reasons and the final state."""
    state = rules.init_state(config)
    reasons = []
    for v in values:
        d = rules.decide(state, _inputs(v, loss=1.0), torch.tensor(scale), config)
        state = rules.advance(state, d)
        reasons.append(rules.SKIP_REASONS[int(d.reason)])
    return reasons, state


def test_sigma_rule_compares_with_the_window_of_applied_steps() -> None:
    config = ScalerConfig(skip_grad_norm_sigma=3.0, spike_window=4, spike_warmup=4)
    norms = [1.0, 1.2, 0.8, 1.1, 5.0, 1.0, 1.3, 0.9, 1.05]
    reasons, state = _feed(config, norms)
    assert reasons[4] == "norm_spike" and reasons.count("norm_spike") == 1
    applied = [v for v, r in zip(norms, reasons, strict=True) if r == "none"]
    assert int(state.num_norms) == len(applied) == 8
    # The ring holds the last 4 applied norms (written at num_norms % 4).
    assert sorted(state.norm_history.tolist()) == pytest.approx(sorted(applied[-4:]))
    # The same value passes once the window holds noisier steps: the bar is mean + k * std.
    window = torch.tensor(applied[-4:], dtype=torch.float64)
    bar = float(window.mean() + 3.0 * window.std())
    below = rules.decide(state, _inputs(bar * 0.999, 1.0), torch.tensor(1.0), config)
    above = rules.decide(state, _inputs(bar * 1.001, 1.0), torch.tensor(1.0), config)
    assert (bool(below.skip), bool(above.skip)) == (False, True)


def test_warmup_and_ratio_and_absolute_threshold() -> None:
    config = ScalerConfig(skip_grad_norm_ratio=2.0, spike_window=8, spike_warmup=3)
    reasons, _ = _feed(config, [1.0, 5.0, 1.0, 1.0, 4.5, 3.9])
    # Warm-up: 5.0 at the second step passes (one applied step recorded) and joins the window;
    # after 3, 4.5 > 2 x mean(1, 5, 1, 1) = 4 is a spike, 3.9 is not.
    assert reasons == ["none", "none", "none", "none", "norm_spike", "none"]
    absolute = ScalerConfig(skip_grad_norm_above=3.0, spike_warmup=50)
    reasons, _ = _feed(absolute, [1.0, 3.5, 2.9])
    assert reasons == ["none", "norm_spike", "none"]  # no warm-up for an absolute threshold


def test_loss_rules_and_non_finite_loss() -> None:
    config = ScalerConfig(skip_loss_above=10.0)
    state = rules.init_state(config)
    scale = torch.tensor(8.0)
    for loss, want in [(1.0, "none"), (11.0, "loss_spike"), (NAN, "loss_spike"), (None, "none")]:
        d = rules.decide(state, _inputs(1.0, loss), scale, config)
        assert rules.SKIP_REASONS[int(d.reason)] == want, loss
        state = rules.advance(state, d)
    assert int(state.num_losses) == 1 and int(state.loss_spikes) == 2
    assert math.isnan(float(state.loss))  # the last step gave no loss
    # Non-finite gradients with a loss spike: the batch's doing, a held loss spike, no overflow.
    d = rules.decide(state, _inputs(INF, 11.0, overflow=True, bad_ranks=[0]), scale, config)
    assert (rules.SKIP_REASONS[int(d.reason)], bool(d.skip)) == ("loss_spike", True)
    d = rules.decide(state, _inputs(INF, 1.0, overflow=True, bad_ranks=[0]), scale, config)
    assert (rules.SKIP_REASONS[int(d.reason)], bool(d.skip)) == ("overflow", False)


def test_fault_kinds_and_precedence() -> None:
    config = ScalerConfig(on_fault="skip", fault_repeats=2, min_scale=4.0)
    state = rules.init_state(config)
    scale = torch.tensor(64.0)

    def step(**kw):
        nonlocal state
        d = rules.decide(state, _inputs(1.0, **kw), scale, config)
        state = rules.advance(state, d)
        return rules.SKIP_REASONS[int(d.reason)], rules.FAULT_KINDS[int(d.fault_kind)], int(d.fault_rank)

    # Before any clean step a lone rank is an overflow, however often (start-up backoffs).
    assert step(loss=1.0, overflow=True, bad_ranks=[1]) == ("overflow", "none", -1)
    assert step(loss=1.0, overflow=True, bad_ranks=[1]) == ("overflow", "none", -1)
    assert step(loss=1.0) == ("none", "none", -1)
    assert step(loss=1.0, overflow=True, bad_ranks=[1]) == ("overflow", "none", -1)
    assert step(loss=1.0, overflow=True, bad_ranks=[1]) == ("fault", "lone_rank", 1)
    assert step(loss=1.0, overflow=True, bad_ranks=[0, 1]) == ("overflow", "none", -1)  # not one rank
    assert step(loss=NAN) == ("fault", "nonfinite_loss", 0)  # finite grads, rank 0's loss non-finite
    scale = torch.tensor(4.0)  # at min_scale: a backoff cannot cure it
    assert step(loss=1.0, overflow=True, bad_ranks=[0, 1]) == ("fault", "min_scale", -1)
    assert int(state.suspected_faults) == 3 and int(state.fault_rank) == -1


# ---------------------------------------------------------------------------- held steps


def test_a_held_step_keeps_the_scale_state() -> None:
    config = ScalerConfig(growth_interval=3, hysteresis=2)
    state = policy.init_state(config)
    state = policy.update(state, torch.tensor(1.0), config)  # spends one hysteresis
    held = policy.update(state, torch.tensor(0.0), config, held=torch.tensor(True))
    for name in policy.ScaleState._fields:
        if name != "num_updates":
            assert torch.equal(getattr(held, name), getattr(state, name)), name
    assert int(held.num_updates) == int(state.num_updates) + 1
    applied = policy.update(state, torch.tensor(0.0), config, held=torch.tensor(False))
    assert all(
        torch.equal(a, b)
        for a, b in zip(applied, policy.update(state, torch.tensor(0.0), config), strict=True)
    )


def _train(scaler, steps, plants, spikes, opt_kind="sgd", start=0, net=None, opt=None):
    if net is None:
        net = tiny.model()
        opt = (
            torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            if opt_kind == "sgd"
            else torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
        )
    reasons, scales = [], []
    for step in range(start, steps):
        opt.zero_grad(set_to_none=True)
        tiny.backward(net, scaler, step)
        if step in spikes:
            for p in net.parameters():
                p.grad.mul_(spikes[step])
        if step in plants:
            tiny.plant(net, plants[step])
        scaler.step(opt)
        scaler.update()
        reasons.append(getattr(scaler, "last_skip_reason", None))
        scales.append(scaler.get_scale())
    return net, reasons, scales


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw_fused"])
def test_rules_that_never_fire_leave_torchs_results_bitwise(opt_kind: str) -> None:
    plants = {2: INF, 5: NAN}
    ours = distscale.GradScaler("cpu", init_scale=2.0**12, growth_interval=2, skip_grad_norm_above=1e30)
    ours_on = distscale.GradScaler(
        "cpu", init_scale=2.0**12, growth_interval=2, skip_loss_sigma=1e6, on_fault="warn", spike_window=3
    )
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    a, reasons, scales_a = _train(ours, 10, plants, {}, opt_kind)
    b, _, scales_b = _train(ours_on, 10, plants, {}, opt_kind)
    c, _, scales_c = _train(theirs, 10, plants, {}, opt_kind)
    assert scales_a == scales_b == scales_c
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, r) and torch.equal(q, r)
    assert reasons == [None, None, "overflow", None, None, "overflow", None, None, None, None]


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw_fused"])
def test_a_norm_spike_is_skipped_without_backoff_and_counted(opt_kind: str) -> None:
    scaler = distscale.GradScaler(
        "cpu", init_scale=2.0**10, growth_interval=4, skip_grad_norm_sigma=6.0, spike_window=5, spike_warmup=5
    )
    _, reasons, scales = _train(scaler, 12, {}, {8: 1e4}, opt_kind)
    assert reasons == [None] * 8 + ["norm_spike"] + [None] * 3
    assert scales[8] == scales[7]
    m = scaler.metrics()
    assert (m["norm_spikes"], m["skipped_steps"], m["overflows"]) == (1, 0, 0)
    # Held: the growth tracker neither advanced nor restarted over the spike (4 clean steps per growth).
    assert scaler.state_dict()["state"]["num_updates"] == 12
    assert m["steps"] == 12 and scaler.state_dict()["rules"]["num_norms"] == 11


def test_skip_reason_without_rules_and_metrics_keys() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=2.0**10)
    _, reasons, _ = _train(scaler, 3, {1: INF}, {})
    assert reasons == [None, "overflow", None]
    m = scaler.metrics()
    assert {
        "norm_spikes",
        "loss_spikes",
        "suspected_faults",
        "skip_reason",
        "fault_rank",
        "observed_loss",
    } <= set(m)
    assert (m["skip_reason"], m["norm_spikes"], m["fault_rank"]) == (0, 0, -1) and math.isnan(
        m["observed_loss"]
    )


def test_on_fault_raise_names_the_fault_and_leaves_a_usable_scaler() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=1.0, on_fault="raise")
    net = tiny.model()
    scaler.set_parameter_names(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    tiny.backward(net, scaler, 0)
    tiny.plant(net, NAN)
    scaler.step(opt)
    with pytest.raises(
        FaultError, match=r"(?s)suspected fault \(min_scale.*rank 0 on host .*0\.weight"
    ) as info:
        scaler.update()
    assert info.value.report.kind == "min_scale" and info.value.report.rank == 0
    assert scaler.get_scale() == 1.0 and scaler.last_skip_reason == "fault"
    assert scaler.state_dict()["rules"]["suspected_faults"] == 1
    opt.zero_grad()
    tiny.backward(net, scaler, 1)  # the scaler goes on
    scaler.step(opt)
    scaler.update()
    assert scaler.last_skip_reason is None


def test_on_fault_warn_warns_with_the_report() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=1.0, on_fault="warn")
    with pytest.warns(RuntimeWarning, match="suspected fault"):
        _train(scaler, 2, {1: INF}, {})
    assert scaler.last_fault_report is not None and scaler.last_fault_report.step == 1


# ---------------------------------------------------------------------------- state


RULED = {
    "skip_grad_norm_sigma": 4.0,
    "skip_loss_ratio": 3.0,
    "spike_window": 4,
    "spike_warmup": 2,
    "on_fault": "skip",
}


def test_resume_is_bitwise_and_the_state_round_trips() -> None:
    plants, spikes = {3: INF, 9: NAN}, {6: 1e4}
    whole = distscale.GradScaler("cpu", init_scale=2.0**10, growth_interval=2, **RULED)
    net_whole, reasons, _ = _train(whole, 12, plants, spikes)
    assert "norm_spike" in reasons and reasons.count("overflow") == 2
    first = distscale.GradScaler("cpu", init_scale=2.0**10, growth_interval=2, **RULED)
    net = tiny.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    _train(first, 5, plants, spikes, net=net, opt=opt)
    saved = first.state_dict()
    torch.save(saved, buffer := io.BytesIO())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    second = distscale.GradScaler("cpu")
    second.load_state_dict(loaded)
    assert second.config == first.config and second.state_dict() == saved
    assert pickle.loads(pickle.dumps(first)).state_dict() == saved
    # The statistics carry over: the spike at step 6 is judged against steps 0-4's norms.
    _, rest, _ = _train(second, 12, plants, spikes, start=5, net=net, opt=opt)
    assert rest == reasons[5:]
    assert second.state_dict() == whole.state_dict()
    for p, q in zip(net.parameters(), net_whole.parameters(), strict=True):
        assert torch.equal(p, q)


def test_version_4_state_keeps_the_loaders_rules_and_starts_fresh_statistics() -> None:
    from distscale import checkpoint

    state = distscale.GradScaler("cpu").state_dict()
    old = copy.deepcopy(state)
    old["format_version"] = 4
    del old["rules"]
    for key, since in checkpoint.CONFIG_SINCE.items():
        if since > 4:
            del old["config"][key]
    target = distscale.GradScaler("cpu", **RULED)
    target.load_state_dict(old)
    assert target.config.skip_grad_norm_sigma == 4.0 and target.config.on_fault == "skip"
    assert target.state_dict()["rules"] == distscale.GradScaler("cpu", **RULED).state_dict()["rules"]


def test_a_bad_rules_state_is_refused_and_changes_nothing() -> None:
    source = distscale.GradScaler("cpu", **RULED)
    state = source.state_dict()
    target = distscale.GradScaler("cpu", **RULED)
    before = target.state_dict()
    for edit, message in [
        (
            lambda s: s["rules"].__setitem__("norm_history", [0.0] * 3),
            r"rules\['norm_history'\] must be a list of 4",
        ),
        (lambda s: s["rules"].__setitem__("lone_rank", -3), r"rules\['lone_rank'\] must be >= -2"),
        (lambda s: s["rules"].pop("loss"), r"missing \['loss'\]"),
    ]:
        broken = copy.deepcopy(state)
        edit(broken)
        with pytest.raises((ValueError, TypeError), match=message):
            target.load_state_dict(broken)
        assert target.state_dict() == before


def test_no_warning_from_rules_that_are_off() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(distscale.GradScaler("cpu", init_scale=1.0), 3, {1: INF}, {})


def test_spike_rules_add_no_host_sync_with_a_fused_optimizer() -> None:
    from distscale.testing import count_host_syncs

    scaler = distscale.GradScaler(
        "cpu",
        init_scale=2.0**10,
        skip_grad_norm_sigma=6.0,
        skip_loss_sigma=6.0,
        spike_window=4,
        spike_warmup=2,
    )
    net = tiny.model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        tiny.backward(net, scaler, step)
        if step == 6:
            for p in net.parameters():
                p.grad.mul_(1e4)
        with count_host_syncs() as reads:
            scaler.step(opt)
            scaler.update()
        assert sum(reads.values()) == 0, (step, reads)
    assert scaler.metrics()["norm_spikes"] == 1
