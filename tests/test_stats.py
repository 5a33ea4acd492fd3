"""The metrics kept on the device (distscale.stats) as the scaler advances them: their definitions,
their cost in host reads, and their checkpoint (one process)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import distscale
from distscale import stats
from distscale.checkpoint import FORMAT_VERSION
from distscale.testing import count_host_syncs
from tests import tiny

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- metrics


def _expected_counters(skipped: list[bool]) -> list[dict[str, int]]:
    """The counters' definitions, written out on the host."""
    rows, consecutive, longest, since = [], 0, 0, 0
    for s in skipped:
        consecutive = consecutive + 1 if s else 0
        longest = max(longest, consecutive)
        since = 0 if s else since + 1
        rows.append(
            {
                "consecutive_overflows": consecutive,
                "max_consecutive_overflows": longest,
                "steps_since_overflow": since,
                "step_was_skipped": s,
            }
        )
    return rows


def test_metrics_follow_their_definitions_step_by_step() -> None:
    plants = {1: INF, 2: NAN, 3: -INF, 6: INF, 9: NAN}
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    got = tiny.run(scaler, model, opt, plants, 11)
    expected = _expected_counters([s in plants for s in range(11)])
    for step, (m, e) in enumerate(zip(got, expected, strict=True)):
        assert {k: m[k] for k in e} == e, f"step {step}: {m}"
        assert m["steps"] == step + 1
        assert m["skipped_steps"] == m["overflows"] == sum(1 for s in plants if s <= step)
        assert math.isnan(m["grad_norm"]), "no clipping: the norm is not measured"
        assert math.isnan(m["zero_fraction"]) and math.isnan(m["underflow_fraction"])
        previous = got[step - 1]["scale"] if step else 2.0**12
        if step in plants:
            assert m["scale"] == previous / 2
    assert got[-1]["scale"] == scaler.get_scale()
    assert got[-1]["max_consecutive_overflows"] == 3


def test_overflows_count_each_optimizer_and_grad_norm_is_the_clip_norm() -> None:
    model = tiny.model()
    params = list(model.parameters())
    opt_a = torch.optim.SGD(params[:2], lr=0.01)
    opt_b = torch.optim.SGD(params[2:], lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    norms = []
    for step in range(4):
        for opt in (opt_a, opt_b):
            opt.zero_grad(set_to_none=True)
        tiny.backward(model, scaler, step)
        if step == 1:
            params[0].grad.view(-1)[0] = INF  # opt_a only
        if step == 2:
            params[0].grad.view(-1)[0] = INF
            params[2].grad.view(-1)[0] = NAN  # both optimizers
        norms.append(scaler.clip_grad_norm_(opt_a, 1.0).item())
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        m = scaler.metrics()
        assert m["overflows"] == [0, 1, 3, 3][step], (step, m)
        assert m["skipped_steps"] == [0, 1, 2, 2][step]
        if math.isfinite(norms[-1]):
            assert m["grad_norm"] == pytest.approx(norms[-1], rel=0, abs=0)
        else:
            assert not math.isfinite(m["grad_norm"])


def test_steps_at_min_scale() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=4.0, min_scale=1.0, growth_interval=100)
    got = tiny.run(scaler, model, opt, {0: INF, 1: INF, 2: INF, 3: INF}, 5)
    # 4 -> 2 -> 1 (at the floor) -> 1 -> 1 (clamped) -> clean step, still at 1.
    assert [m["scale"] for m in got] == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert [m["steps_at_min_scale"] for m in got] == [0, 1, 2, 3, 4]


def test_metrics_cost_one_host_read_and_the_step_none() -> None:
    model = tiny.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        opt.zero_grad()
        tiny.backward(model, scaler, step)
        with count_host_syncs() as reads:
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
            tensors = scaler.metric_tensors()
            skipped = scaler.step_was_skipped
        assert sum(reads.values()) == 0, reads
        assert set(tensors) == set(scaler.metrics())
        assert skipped.dtype is torch.bool and skipped.shape == ()
        with count_host_syncs() as reads:
            scaler.metrics()
        assert sum(reads.values()) == 1, reads


def test_metric_tensors_are_copies() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu")
    tiny.run(scaler, model, opt, {}, 1)
    before = scaler.metric_tensors()
    tiny.run(scaler, model, opt, {0: INF}, 1)
    assert before["skipped_steps"].item() == 0 and scaler.metrics()["skipped_steps"] == 1


def test_disabled_scaler_has_no_metrics() -> None:
    scaler = distscale.GradScaler("cpu", enabled=False)
    assert scaler.metrics() == {} and scaler.metric_tensors() == {}
    assert scaler.last_step_skipped() is False


def test_last_step_skipped_reads_nothing_when_step_already_did() -> None:
    model = tiny.model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu")
    for plants, expected in (({}, False), ({0: INF}, True)):
        tiny.run(scaler, model, sgd, plants, 1)
        with count_host_syncs() as reads:
            assert scaler.last_step_skipped() is expected
        assert sum(reads.values()) == 0, "SGD's step already read the flag"
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tiny.run(scaler, model, fused, {0: NAN}, 1)
    with count_host_syncs() as reads:
        assert scaler.last_step_skipped() is True
        assert scaler.last_step_skipped() is True  # cached
    assert sum(reads.values()) == 1


# ---------------------------------------------------------------------------- state


def test_stats_are_checkpointed_and_resume_exactly() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12, underflow_every=2)
    tiny.run(scaler, model, opt, {1: INF, 2: NAN}, 4, clip=1.0)
    state = scaler.state_dict()
    assert state["format_version"] == FORMAT_VERSION == 5
    assert set(state["stats"]) == set(stats.ScalerStats._fields)
    assert state["stats"]["grad_norm"] is not None and state == scaler.state_dict()
    restored = distscale.GradScaler("cpu")
    restored.load_state_dict(state)
    assert restored.metrics() == pytest.approx(scaler.metrics(), nan_ok=True)
    assert restored.last_step_skipped() is scaler.last_step_skipped()
    # torch.save(weights_only=True) takes it as is.
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.metrics() == pytest.approx(scaler.metrics(), nan_ok=True)
    assert clone._engine.underflow_every == 2


def test_version_2_state_loads_with_fresh_stats() -> None:
    from distscale import checkpoint

    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    del state["stats"], state["rules"]
    state["format_version"] = 2
    for key, since in checkpoint.CONFIG_SINCE.items():  # what version 2 did not have yet
        if since > 2:
            del state["config"][key]
    for key, spec in checkpoint.STATE_FIELDS.items():
        if spec.since > 2:
            del state["state"][key]
    scaler.load_state_dict(state)
    m = scaler.metrics()
    assert m["overflows"] == 0 and math.isnan(m["grad_norm"])


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("grad_norm", -1.0, ValueError, "grad_norm"),
        ("grad_norm", "big", TypeError, "grad_norm"),
        ("zero_fraction", 1.5, ValueError, "zero_fraction"),
        ("overflows", -1, ValueError, "overflows"),
        ("overflows", 1.0, TypeError, "overflows"),
        ("step_was_skipped", 1, TypeError, "step_was_skipped"),
    ],
)
def test_bad_stats_are_refused_and_leave_the_scaler_unchanged(key, value, error, match) -> None:
    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    state["stats"][key] = value
    before = scaler.metrics()
    with pytest.raises(error, match=match):
        scaler.load_state_dict(state)
    assert scaler.metrics() == pytest.approx(before, nan_ok=True)


def test_missing_stats_key_is_named() -> None:
    scaler = distscale.GradScaler("cpu")
    state = scaler.state_dict()
    del state["stats"]["overflows"]
    with pytest.raises(ValueError, match=r"missing \['overflows'\]"):
        scaler.load_state_dict(state)


# ---------------------------------------------------------------------------- amax, headroom, scale changes


def test_amax_headroom_and_scale_changes_follow_the_step() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler(
        "cpu", init_scale=2.0**12, growth_interval=2, rule="amax", amax_margin=2.0**4
    )
    seen = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        tiny.backward(model, scaler, step)
        if step == 3:
            tiny.plant(model, INF)
        want = max(float(p.grad.abs().max()) for p in model.parameters())  # scaled, as read
        scale_before = scaler.get_scale()
        with count_host_syncs() as reads:
            scaler.step(opt)
            scaler.update()
        m = scaler.metrics()
        seen.append((m["scale_change"], scaler.get_scale() / scale_before))
        if step == 3:
            assert math.isnan(m["amax"]) and math.isnan(m["headroom_log2"])  # a skipped step
        else:
            assert m["amax"] == pytest.approx(want, rel=1e-6)
            assert m["headroom_log2"] == math.floor(math.log2(65504.0 / m["amax"]))
        assert sum(reads.values()) == 1  # step()'s read of the flags: amax costs none
    codes = [stats.SCALE_CHANGES[code] for code, _ in seen]
    assert codes[0] == "calibrated" and seen[0][1] == 2.0 ** round(math.log2(seen[0][1]))
    assert codes[3] == "backed_off" and seen[3][1] == 0.5
    assert all(c in ("unchanged", "grew") for c in codes[1:3] + codes[4:])
    grew = [ratio for code, ratio in seen if stats.SCALE_CHANGES[code] == "grew"]
    assert all(r >= 2.0 and r == 2.0 ** round(math.log2(r)) for r in grew), grew  # as far as the peak allows


def test_a_scale_set_by_hand_empties_the_amax_window() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = distscale.GradScaler("cpu", init_scale=2.0**12, growth_interval=100, rule="amax")
    tiny.run(scaler, model, opt, {}, 3)  # calibrates, then two steps fill the window
    assert scaler.state_dict()["state"]["amax_window"] > 0
    scaler.update(new_scale=2.0**5)  # magnitudes scaled by the old scale describe nothing now
    assert scaler.state_dict()["state"]["amax_window"] == 0.0
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(new_scale=-1.0)  # refused before anything changes
    assert scaler.get_scale() == 2.0**5


def test_the_torch_rule_does_not_measure_amax() -> None:
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    got = tiny.run(distscale.GradScaler("cpu", init_scale=2.0**12), model, opt, {}, 2)
    assert all(math.isnan(m["amax"]) and math.isnan(m["headroom_log2"]) for m in got)
