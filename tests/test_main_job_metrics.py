"""The main job's view of the scaler: --policy, its metrics stream, the policy comparison and the
plot made from its output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distscale.stats import SCALE_CHANGES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import compare_policies  # noqa: E402
import train  # noqa: E402


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("torch", {"hysteresis": 1, "growth_delay": 0, "min_scale": None, "min_scale_rule": "floor"}),
        ("deepspeed", {"hysteresis": 2, "growth_delay": 1, "min_scale": 1.0, "on_min_scale": "raise"}),
        ("megatron", {"hysteresis": 2, "growth_delay": 0, "min_scale": 1.0}),
        ("fairseq", {"hysteresis": 1, "min_scale_rule": "refuse", "min_scale": 1e-4}),
    ],
)
def test_policy_selects_the_preset_with_the_jobs_scale_and_window(policy, expected) -> None:
    args = train.parse_args(["--policy", policy, "--init-scale", str(2.0**16), "--growth-interval", "7"])
    scaler = train.make_scaler(args, "cpu")
    config = scaler.config
    assert config.init_scale == 2.0**16 and config.growth_interval == 7
    assert {k: getattr(config, k) for k in expected} == expected
    assert scaler._engine.overflow_diagnostics and scaler._engine.underflow_every == 10


def test_policy_deepspeed_needs_a_power_of_two_scale() -> None:
    args = train.parse_args(["--policy", "deepspeed", "--init-scale", "1000"])
    with pytest.raises(SystemExit, match="power of two"):
        train.make_scaler(args, "cpu")


def test_bad_underflow_every_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--underflow-every", "-1"])
    assert "--underflow-every" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_policies_and_plot_the_main_jobs_metrics(tmp_path: Path) -> None:
    # A first scale far above what the model tolerates: every rule must skip its way down.
    out = tmp_path / "table.md"
    rows = compare_policies.main(
        ["--steps", "14", "--nproc", "1", "--workdir", str(tmp_path), "--out", str(out), "--",
         "--init-scale", str(2.0**30), "--underflow-every", "5"]
    )  # fmt: skip
    assert [r["policy"] for r in rows] == list(train.POLICIES)
    for row in rows:
        assert row["skipped steps"] > 0 and math.isfinite(row["final loss"]), row
        assert row["min scale"] < 2.0**30
        assert math.isfinite(row["mean log2 scale"]) and 0 <= row["underflow"] < 1, row
    text = out.read_text()
    assert all(f"| {p} |" in text for p in train.POLICIES)

    # The per-step stream carries the scaler's metrics, and each run used its own rule.
    for policy, hysteresis in (("torch", 1), ("deepspeed", 2), ("megatron", 2), ("fairseq", 1)):
        lines = [json.loads(x) for x in (tmp_path / f"{policy}.jsonl").read_text().splitlines()]
        steps, summary = lines[:-1], lines[-1]
        assert summary["policy"] == policy and len(steps) == 14
        # Hysteresis 2 absorbs the first overflow; hysteresis 1 backs off at once.
        assert steps[0]["skipped"] and steps[0]["scale"] == 2.0**30 / (2 if hysteresis == 1 else 1), policy
        assert sum(s["skipped"] for s in steps) == summary["skipped_steps"] == steps[-1]["skipped_steps"]
        # The monitor measured on steps 0, 5 and 10; the last reading is kept in between.
        zero = [s["zero_fraction"] for s in steps]
        assert all(v is not None and 0 < v < 1 for v in zero), zero
        assert zero[1:5] == [zero[0]] * 4 and zero[6:10] == [zero[5]] * 4

    # The amax rule: measured on every clean step; the first one calibrates the scale.
    steps = [json.loads(x) for x in (tmp_path / "amax.jsonl").read_text().splitlines()][:-1]
    first_clean = next(i for i, s in enumerate(steps) if not s["skipped"])
    assert all(s["amax"] is None and s["headroom_log2"] is None for s in steps[:first_clean])
    assert all(s["amax"] > 0 for s in steps[first_clean:]), steps
    assert SCALE_CHANGES[steps[first_clean]["scale_change"]] == "calibrated"
    # The scale the step ran at, times the headroom of its amax less the default margin (2^3).
    ran_at, amax = steps[first_clean - 1]["scale"], steps[first_clean]["amax"]
    assert steps[first_clean]["scale"] == 2.0 ** math.floor(math.log2(ran_at * 65504 / (amax * 8)))

    png = tmp_path / "torch.png"
    proc = subprocess.run(
        [sys.executable, "-m", "distscale", "plot", str(tmp_path / "torch.jsonl"), "-o", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 10_000 and str(png) in proc.stdout


@pytest.mark.slow
def test_main_job_writes_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--steps", "4", "--no-progress",
         "--tensorboard", str(tb)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"scaler/scale", "scaler/loss", "scaler/skipped_steps", "scaler/zero_fraction"} <= tags, tags
    assert [e.step for e in acc.Scalars("scaler/loss")] == [0, 1, 2, 3]
