"""``distscale.plot`` and ``python -m distscale plot``: reading metrics files and drawing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distscale.__main__ import main
from distscale.plot import (
    CHANGE_MARKERS,
    DPI,
    FIGSIZE,
    SKIP_COLOR,
    overflow_rate,
    plot_metrics,
    read_metrics,
    scale_changes,
)
from distscale.stats import SCALE_CHANGES

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {40, 41, 42, 90, 150}


def _records(n: int = 200) -> list[dict]:
    """launch/train.py-shaped records: the scale halves at each skipped step and doubles every 25."""
    records, scale = [], 2.0**16
    for step in range(n):
        skipped = step in SKIPPED
        if skipped:
            scale /= 2
        elif step % 25 == 24:
            scale *= 2
        records.append(
            {
                "step": step,
                "loss": 4.0 / (1 + step / 20),
                "scale": scale,
                "skipped": skipped,
                "grad_norm": None if skipped else 0.5 + (step % 7) / 10,
                "zero_fraction": 0.02,
                "underflow_fraction": 1e-4 * (1 + step % 3),
            }
        )
    return records


def _write(path: Path, records: list[dict], summary: bool = True) -> Path:
    lines = [json.dumps(r) for r in records]
    if summary:
        lines.append(json.dumps({"summary": True, "final_loss": 0.3, "scale": 1.0, "steps": len(records)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-m", "distscale", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _image(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)  # float RGBA in [0, 1]


def _has_colour(rgb: np.ndarray, hex_colour: str, tol: float = 0.06) -> bool:
    target = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(rgb - target).max(axis=-1) < tol).any())


# --- read_metrics ----------------------------------------------------------------------------------


def test_read_metrics_skips_summary_and_blank_lines_later_duplicates_win(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"step": 0, "loss": 5.0}\n'
        "\n"
        '{"step": 1, "loss": 4.0, "grad_norm": NaN}\n'
        '{"summary": true, "final_loss": 4.0, "steps": 2}\n'
        # a resumed run appends from its checkpoint at step 1: those lines replace the first run's
        '{"step": 1, "loss": 3.5}\n'
        '{"step": 2, "loss": 3.0}\n'
        "   \n"
        '{"summary": true, "final_loss": 3.0, "steps": 3}\n'
    )
    assert read_metrics(path) == [
        {"step": 0, "loss": 5.0},
        {"step": 1, "loss": 3.5},
        {"step": 2, "loss": 3.0},
    ]


def test_read_metrics_sorts_by_step(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", [{"step": s} for s in (3, 1, 2)], summary=False)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ('{"step": 2, "loss": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"loss": 1.0}', 'expected an integer "step", got None'),
        ('{"step": "3"}', "expected an integer \"step\", got '3'"),
    ],
)
def test_read_metrics_malformed_line_names_file_and_line(tmp_path: Path, bad: str, why: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(f'{{"step": 0}}\n\n{{"step": 1}}\n{bad}\n{{"step": 3}}\n')
    with pytest.raises(ValueError) as info:
        read_metrics(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert why in str(info.value)


def test_overflow_rate_trailing_window() -> None:
    steps = list(range(6))
    flags = [False, True, True, False, False, False]
    # window 2: fraction over (step - 2, step]; the first record only has itself.
    assert overflow_rate(steps, flags, 2) == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    # sparse logging (every 10 steps): the window counts the logged steps inside it
    assert overflow_rate([0, 10, 20, 30], [True, False, True, True], 25) == [1.0, 0.5, 2 / 3, 2 / 3]


# --- plot_metrics ----------------------------------------------------------------------------------


def test_cli_plot_writes_png_of_fixed_size_with_skip_markers(tmp_path: Path) -> None:
    metrics = _write(tmp_path / "m.jsonl", _records())
    out = tmp_path / "plots" / "m.png"
    proc = _cli("plot", str(metrics), "-o", str(out), "--window", "20", "--title", "synthetic")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(out)
    assert lines[1] == "200 steps (0..199), 5 skipped (2.5%), final scale 524288"
    image = _image(out)
    width, height = FIGSIZE[0] * DPI, FIGSIZE[1] * DPI
    assert image.shape[:2] == (height, width)
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "the image is (nearly) blank"
    assert len(np.unique((rgb * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)) > 50
    assert _has_colour(rgb, SKIP_COLOR), "no skipped-step marker colour in the image"


def test_plot_missing_panels_and_default_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only the scale recorded (no loss, grad norm or skip flags): still a full-size image, no markers."""
    metrics = _write(
        tmp_path / "only_scale.jsonl", [{"step": s, "scale": 2.0 ** (10 + s // 10)} for s in range(30)]
    )
    assert main(["plot", str(metrics), "--window", "5"]) == 0
    out = tmp_path / "only_scale.png"  # default: next to the metrics file
    assert capsys.readouterr().out.splitlines() == [
        str(out),
        "30 steps (0..29), 0 skipped (0.0%), final scale 4096",
    ]
    image = _image(out)
    assert image.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)
    assert not _has_colour(image[..., :3], SKIP_COLOR, tol=0.02), "nothing was skipped"


def _amax_records() -> list[dict]:
    """An amax-rule run: skipped at step 0, calibrated at 1, grows at 30 and 60, held at min at 80."""
    code = {name: i for i, name in enumerate(SCALE_CHANGES)}
    records, scale = [], 2.0**20
    for step in range(100):
        change = {0: "backed_off", 1: "calibrated", 30: "grew", 60: "grew", 80: "held_at_min"}.get(
            step, "unchanged"
        )
        scale = {"backed_off": scale / 2, "calibrated": 2.0**12, "grew": scale * 4}.get(change, scale)
        amax = None if step == 0 else 2.0 ** (6 + step / 50)
        records.append(
            {
                "step": step,
                "scale": scale,
                "skipped": step in (0, 80),
                "amax": amax,
                "headroom_log2": None if amax is None else float(int(16 - 6 - step / 50)),
                "scale_change": code[change],
            }
        )
    return records


def test_plot_marks_scale_changes_by_reason_and_draws_the_headroom(tmp_path: Path) -> None:
    records = _amax_records()
    assert scale_changes(records) == {
        "calibrated": [(1, 2.0**12)],
        "grew": [(30, 2.0**14), (60, 2.0**16)],
        "held_at_min": [(80, 2.0**16)],
    }
    rgb = _image(plot_metrics(records, tmp_path / "amax.png"))[..., :3]
    for reason, (_, color) in CHANGE_MARKERS.items():
        assert _has_colour(rgb, color), f"no {reason} marker colour in the image"
    assert _has_colour(rgb, "#8c564b"), "no headroom line"
    # Without the amax fields: no headroom panel, no change markers (codes of another version skipped).
    plain = [
        {k: v for k, v in r.items() if k not in ("headroom_log2", "amax")} | {"scale_change": 99}
        for r in records
    ]
    assert scale_changes(plain) == {}
    rgb = _image(plot_metrics(plain, tmp_path / "plain.png"))[..., :3]
    assert not _has_colour(rgb, "#8c564b", tol=0.02) and not _has_colour(
        rgb, CHANGE_MARKERS["grew"][1], tol=0.02
    )


def test_plot_metrics_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        plot_metrics(_records(5), tmp_path / "x.png", window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        plot_metrics(_records(5), tmp_path / "x.png", window=2.5)
    with pytest.raises(ValueError, match="records is empty"):
        plot_metrics([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- CLI errors ------------------------------------------------------------------------------------


def test_cli_missing_file_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = _cli("plot", str(missing))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"distscale plot: error: metrics file not found: {missing}\n"


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\n{oops\n')
    assert main(["plot", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distscale plot: error: {bad}:2: not valid JSON") and err.count("\n") == 1

    summary_only = _write(tmp_path / "s.jsonl", [], summary=True)
    assert main(["plot", str(summary_only)]) == 2
    assert capsys.readouterr().err == f"distscale plot: error: {summary_only} has no step records\n"
    assert not list(tmp_path.glob("*.png"))


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    for argv in ([], ["plot", "m.jsonl", "--window", "0"], ["nosuch"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "--window: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_skipped_steps_are_marked_by_reason(tmp_path: Path) -> None:
    """Records with skip_reason codes: a norm spike and a fault get their own markers and colours."""
    from distscale.plot import SKIP_MARKERS, skip_reason
    from distscale.rules import SKIP_REASONS

    codes = {10: "norm_spike", 20: "fault", 21: "fault"}
    records = [
        {
            "step": s,
            "scale": 1024.0,
            "loss": 1.0,
            "skipped": s in codes,
            "skip_reason": SKIP_REASONS.index(codes[s]) if s in codes else 0,
        }
        for s in range(30)
    ]
    assert [skip_reason(r) for r in records if r["skipped"]] == ["norm_spike", "fault", "fault"]
    assert skip_reason({"step": 0, "skipped": True}) == "skipped"  # metrics without reasons
    out = tmp_path / "reasons.png"
    plot_metrics(records, out, window=5)
    rgb = _image(out)[..., :3]
    assert _has_colour(rgb, SKIP_MARKERS["norm_spike"][1]), "no norm-spike marker"
    assert not _has_colour(rgb, SKIP_MARKERS["loss_spike"][1], tol=0.02), "no loss spike happened"
