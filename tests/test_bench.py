"""The benchmark suite: the quick run end to end, and its arithmetic (bytes, GB/s, targets).

Timings are never asserted; correctness results and counts are.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from bench import implementations, measure, report, runner
from bench import scenarios as sc
from bench.implementations import Context, Impl, Outcome, Scale

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = out.glob("*-quick.json")
    (md_path,) = out.glob("*-quick.md")
    return json.loads(json_path.read_text()), md_path.read_text()


@pytest.mark.slow
def test_quick_run_covers_every_scenario_impl_and_variant(quick: tuple[dict, str]) -> None:
    results, _ = quick
    wanted = {s.id for s in sc.scenarios("quick")}
    assert {s["id"] for s in results["scenarios"]} == wanted
    impls = set(results["impls"])
    assert {"distscale-inplace", "distscale-readonly", "torch-chain", "torch-fused-check"} <= impls
    assert {"megatron-chain", "deepspeed-zero", "deepspeed-legacy"} <= impls
    seen = {(r["scenario"], r["variant"], r["impl"]) for r in results["rows"]}
    assert seen == {(s, v, i) for s in wanted for v in sc.VARIANTS for i in impls}


@pytest.mark.slow
def test_quick_run_every_verification_passed(quick: tuple[dict, str]) -> None:
    results, _ = quick
    bad = [
        (r["scenario"], r["variant"], r["impl"], r.get("detail"))
        for r in results["rows"]
        if not r["verified"]
    ]
    assert not bad
    assert all(r["status"] == "ok" and r["device_ms"] > 0 for r in results["rows"])
    assert all(step["verified"] for step in results["steps"])
    assert {(s["optimizer"], s["scaler"]) for s in results["steps"]} == {
        (o, k) for o in ("sgd", "adamw-fused") for k in ("distscale", "distscale+rules", "torch")
    }


@pytest.mark.slow
def test_quick_run_planted_rows_report_found_inf(quick: tuple[dict, str]) -> None:
    results, _ = quick
    planted = [r for r in results["rows"] if r["variant"] != "clean"]
    assert planted and all(r["found_inf"] is True for r in planted)
    assert all(r["found_inf"] is False for r in results["rows"] if r["variant"] == "clean")


@pytest.mark.slow
def test_quick_run_multirank_counts_and_consistency(quick: tuple[dict, str]) -> None:
    results, _ = quick
    mr = results["multirank"]
    assert mr["world_size"] == 2 and "error" not in mr
    rows = {r["scaler"]: r for r in mr["rows"]}
    assert set(rows) == {"distscale", "sharded"}
    assert all(r["planted_inf_skipped_consistently"] for r in rows.values())
    assert rows["distscale"]["collectives_per_step"] == 1


@pytest.mark.slow
def test_quick_run_report(quick: tuple[dict, str]) -> None:
    results, md = quick
    meta = results["meta"]
    assert meta["device"] in md and meta["torch"] in md
    assert meta["copy_bandwidth"]["gbs"] > 0
    metrics = [t["metric"] for t in results["targets"]]
    assert len(metrics) == 9
    allowed = {"met", "missed", report.NA_CPU, report.NOT_MEASURED}
    assert all(t["status"] in allowed for t in results["targets"])
    assert "## Targets" in md and "## Multi-rank" in md


# ---------------------------------------------------------------------------- arithmetic

BILLION_FP32 = measure.Sizes(nbytes=4 * 10**9, elements=10**9)


def test_bytes_model_matches_perf_md() -> None:
    assert measure.read_only(BILLION_FP32) == 4 * 10**9  # 4P
    assert measure.in_place(BILLION_FP32) == 8 * 10**9  # 8P
    assert measure.torch_chain(BILLION_FP32) == 20 * 10**9  # 20P
    assert measure.fused_check(BILLION_FP32) == 8 * 10**9  # 8P, it writes with inv_scale=1
    assert measure.megatron(BILLION_FP32, overflow=False) == 20 * 10**9
    assert measure.megatron(BILLION_FP32, overflow=True) == 8 * 10**9  # no norm, no clip
    assert measure.deepspeed(BILLION_FP32, overflow=True) == 8 * 10**9  # amax + amin reads


def test_bytes_model_16bit_and_mixed() -> None:
    half = measure.Sizes.of([torch.empty(1000, dtype=torch.float16)])
    assert (half.nbytes, half.elements, half.converted) == (2000, 1000, 1000)
    assert measure.in_place(half) == 4000  # 4P for 16-bit grads
    mixed = measure.Sizes.of([torch.empty(10), torch.empty(10, dtype=torch.bfloat16)])
    assert (mixed.nbytes, mixed.converted) == (60, 10)
    # legacy check: read the bf16 tensor (20 B) and write its fp32 copy (40 B), then 22 B/element
    assert measure.deepspeed_legacy(mixed, overflow=True) == 20 + 40 + 22 * 20


def test_floor_and_bandwidth_arithmetic() -> None:
    bw = 3000.0  # GB/s, PERF.md's planning value
    assert measure.floor_ms(measure.read_only(BILLION_FP32), bw) == pytest.approx(1.3333, rel=1e-4)
    assert measure.floor_ms(measure.in_place(BILLION_FP32), bw) == pytest.approx(2.6667, rel=1e-4)
    assert measure.floor_ms(measure.torch_chain(BILLION_FP32), bw) == pytest.approx(6.6667, rel=1e-4)
    assert measure.gbs(8e9, 2.0) == pytest.approx(4000.0)
    assert measure.copy_gbs(10**9, 1.0) == pytest.approx(2000.0)  # read + write
    assert measure.pct_of(1500.0, 3000.0) == pytest.approx(50.0)


def _row(scenario: str, impl: str, ms: float, **kw) -> dict:
    family = "distscale" if impl.startswith("distscale") else "peer"
    mode = {"distscale-inplace": "inplace", "distscale-readonly": "readonly"}.get(impl.split("-triton")[0])
    row = {"scenario": scenario, "group": "S1", "variant": "clean", "impl": impl, "family": family,
           "mode": mode, "status": "ok", "device_ms": ms, "elements": 10**9, "n_tensors": 1, "syncs": 0}  # fmt: skip
    return {**row, **kw}


def _gpu_rows() -> list[dict]:
    return [
        _row("S1:flat-1B", "distscale-inplace", 2.8, x_floor=2.8 / 2.6667),
        _row("S1:flat-1B", "distscale-readonly", 2.0, x_floor=1.5),
        _row("S1:flat-1B", "distscale-readonly-triton", 1.4, x_floor=1.4 / 1.3333),
        _row("S1:flat-1B", "torch-chain", 7.0),
        _row("S1:flat-1B", "torch-fused-check", 2.8),
        _row("S1:flat-1B", "distscale-inplace", 0.5, variant="inf@first", x_floor=0.2),  # not a clean row
    ]


def _by_metric(results: list[dict]) -> dict[str, dict]:
    return {t["metric"]: t for t in results}


def test_targets_gpu_ratios_use_fastest_kernel_and_worst_scenario() -> None:
    got = _by_metric(report.evaluate(_gpu_rows(), [], None, "cuda"))
    floor = got["fused check(+unscale)(+norm) time, P ≥ 100M"]
    assert floor["status"] == "met" and floor["measured"].startswith("1.05")  # 2.8 / 2.6667
    inplace = got["vs peer 1 chain, in-place mode"]
    assert inplace["status"] == "met" and inplace["measured"].startswith("2.50")  # 7.0 / 2.8
    folded = got["vs peer 1 chain, folded mode"]
    assert folded["status"] == "met" and folded["measured"].startswith("5.00")  # triton row 1.4
    check = got["vs peer 2 check pass"]
    assert check["status"] == "met" and check["measured"].startswith("2.00")
    # A second scenario where distscale is slower decides (worst case).
    rows = [
        *_gpu_rows(),
        _row("S2:b", "distscale-inplace", 5.0, x_floor=1.9),
        _row("S2:b", "torch-chain", 7.5),
    ]
    got = _by_metric(report.evaluate(rows, [], None, "cuda"))
    assert got["vs peer 1 chain, in-place mode"]["status"] == "missed"
    assert got["vs peer 1 chain, in-place mode"]["measured"].startswith("1.50")
    assert got["fused check(+unscale)(+norm) time, P ≥ 100M"]["status"] == "missed"


def test_targets_host_syncs_collectives_scratch_multirank() -> None:
    host = [
        _row(
            "S4:10000x64",
            "distscale-inplace",
            1.0,
            group="S4",
            n_tensors=10_000,
            host_ms=1.0,
            elements=640_000,
        ),
        _row("S4:10000x64", "torch-chain", 1.0, group="S4", n_tensors=10_000, host_ms=4.0, elements=640_000),
        _row("S1:flat-1B", "distscale-inplace", 2.7, scratch_bytes=(1 << 20) + 10**9 // 64 + 1),
    ]
    steps = [
        {"scaler": "distscale", "optimizer": "sgd", "syncs": 1},
        {"scaler": "distscale", "optimizer": "adamw-fused", "syncs": 0},
        {"scaler": "torch", "optimizer": "sgd", "syncs": 5},  # peers do not count
    ]
    mr = {"world_size": 4, "rows": [{"scaler": "distscale", "collectives_per_step": 1, "region_ms": 2.0},
                                    {"scaler": "sharded", "collectives_per_step": 3, "region_ms": 3.0}]}  # fmt: skip
    got = _by_metric(report.evaluate(host, steps, mr, "cuda"))
    assert got["host (CPU) time at 1k–10k tensors"]["status"] == "met"  # 1/4 ≤ 1/3
    assert got["host syncs per step"]["status"] == "met"
    assert got["collectives per step (found_inf + norm)"]["status"] == "met"
    assert got["scratch memory"]["status"] == "missed"  # one byte over 1 MiB + P/64
    assert got["CPU multi-rank (gloo): full scaler step incl. clip"]["status"] == "met"
    assert got["CPU multi-rank (gloo): full scaler step incl. clip"]["measured"].startswith("1.50")
    steps[1]["syncs"] = 1
    mr["rows"][0]["collectives_per_step"] = 2
    mr["rows"][0]["region_ms"] = 3.5
    got = _by_metric(report.evaluate(host, steps, mr, "cuda"))
    assert got["host syncs per step"]["status"] == "missed"
    assert got["collectives per step (found_inf + norm)"]["status"] == "missed"
    assert got["CPU multi-rank (gloo): full scaler step incl. clip"]["status"] == "missed"


def test_targets_on_cpu_gpu_only_are_not_applicable() -> None:
    rows = [dict(r, elements=1000) for r in _gpu_rows()]  # CPU lists are small: S1/S2 stand in
    got = _by_metric(report.evaluate(rows, [], None, "cpu"))
    for metric in ("fused check(+unscale)(+norm) time, P ≥ 100M", "vs peer 1 chain, in-place mode",
                   "vs peer 2 check pass", "host (CPU) time at 1k–10k tensors", "scratch memory"):  # fmt: skip
        assert got[metric]["status"] == report.NA_CPU
    assert got["vs peer 1 chain, in-place mode"]["measured"].startswith("2.50")  # still shown
    assert got["host syncs per step"]["status"] == report.NOT_MEASURED
    assert got["collectives per step (found_inf + norm)"]["status"] == report.NOT_MEASURED


# ---------------------------------------------------------------------------- scenarios and verification


def test_architectures_have_the_published_tensor_counts() -> None:
    gpt2, llama = sc.gpt2_shapes(), sc.llama_shapes()
    assert len(gpt2) == 148 and sum(math.prod(s) for s in gpt2) == 124_439_808
    assert len(llama) == 291 and sum(math.prod(s) for s in llama) == 6_738_415_616
    shard = sc.fsdp_shard(llama, 8)
    assert len(shard) == 291 and shard[0] == (4000, 4096) and shard[-2] == (512,)
    assert sum(math.prod(s) for s in shard) == pytest.approx(6_738_415_616 / 8, rel=1e-3)
    assert sc.fsdp_shard([(3, 2)], 4, rank=3) == [(0, 2)]
    assert {s.n_tensors for s in sc.scenarios("gpu") if s.group == "S4"} == {1000, 10_000, 2000}


def test_fill_is_random_deterministic_and_planted() -> None:
    scen = sc.scenarios("quick")[-1]  # mixed dtypes
    grads = sc.allocate(scen, torch.device("cpu"))
    sc.fill_(grads, "clean")
    first = [g.clone() for g in grads]
    assert all(bool((g != 0).any()) for g in grads if g.numel() > 1)
    sc.fill_(grads, "nan@last")
    assert math.isnan(float(grads[-1].view(-1)[-1])) and sc.reference(grads).found_inf
    assert torch.equal(grads[0], first[0])
    sc.fill_(grads, "inf@first")
    assert math.isinf(float(grads[0].view(-1)[0]))
    assert {g.dtype for g in grads} == {torch.float32, torch.float16, torch.bfloat16}


def test_a_wrong_implementation_is_reported_not_hidden() -> None:
    def build(grads: list[torch.Tensor], ctx: Context):
        def run(scale: Scale) -> Outcome:
            torch._foreach_mul_(grads, scale.inv_value)
            return Outcome(torch.zeros(()), None)  # never finds inf/NaN

        return run

    wrong = Impl(
        "wrong", "misses inf/NaN", "peer", None, True, None, measure.in_place, lambda r, i, m: i, build
    )
    scen = sc.scenarios("quick")[0]
    settings = runner.Settings(reps=1, warmup=0, budget_s=0.0)
    rows = runner.run_scenario(scen, [wrong, implementations.PEERS[0]], list(sc.VARIANTS), torch.device("cpu"), settings,
                               log=lambda *_: None)  # fmt: skip
    status = {(r["variant"], r["impl"]): r["status"] for r in rows}
    assert status[("clean", "wrong")] == "ok"
    assert status[("inf@first", "wrong")] == status[("nan@last", "wrong")] == "verify-failed"
    assert all(status[(v, "torch-chain")] == "ok" for v in sc.VARIANTS)
    runner.annotate(rows, copy_gbs=10.0)
    planted = [r for r in rows if r["variant"] == "inf@first"]
    assert all(r.get("best_peer") == "torch-chain" for r in planted)  # the failed row is no best peer


def test_cli_filters_select_scenarios_parts_and_impls() -> None:
    from bench.__main__ import select_impls, select_scenarios

    chosen, extras = select_scenarios("quick", ["S1", "s3:gpt2-d16", "multirank"])
    assert [s.id for s in chosen] == ["S1:flat-64K", "S3:gpt2-d16"] and extras == ["multirank"]
    chosen, extras = select_scenarios("quick", [])
    assert len(chosen) == len(sc.scenarios("quick")) and extras == ["step", "multirank"]
    with pytest.raises(SystemExit):
        select_scenarios("quick", ["S9"])
    impls, triton_rows = select_impls(torch.device("cpu"), ["torch-chain", "distscale-readonly"])
    assert [i.name for i in impls] == ["distscale-readonly", "torch-chain"]
    assert triton_rows.startswith("no")
    with pytest.raises(SystemExit):
        select_impls(torch.device("cpu"), ["apex"])


@pytest.mark.slow
def test_hosttime_measures_every_layout_it_names() -> None:
    """A tiny run of bench.hosttime over one-process and 2-rank layouts: rows for both paths,
    positive times, the ratio and the target's verdict computed from them."""
    from bench import hosttime

    rows = hosttime.measure(["separate", "flat", "ddp"], [20], 8, torch.device("cpu"))
    assert [(r["layout"], r["path"]) for r in rows] == [
        (layout, path)
        for layout in ("separate", "flat", "ddp")
        for path in ("unscale_ + update", "clip + update")
    ]
    for r in rows:
        assert r["distscale_ms"] > 0 and r["torch_ms"] > 0
        assert r["ratio"] == pytest.approx(r["distscale_ms"] / r["torch_ms"])
        assert r["met"] == (r["ratio"] <= hosttime.TARGET[r["layout"]])
    assert "| flat | 20 | clip + update |" in hosttime.to_markdown(rows, "header")


# ---------------------------------------------------------------------------- torch's own tests, swapped


_TORCH_STYLE_FILE = """
import torch
from torch.testing._internal.common_device_type import instantiate_device_type_tests, onlyNativeDeviceTypes
from torch.testing._internal.common_dtype import a_helper_this_torch_lacks


class TestTorchDeviceType:
    @onlyNativeDeviceTypes
    def test_grad_scaling_sees_the_class_under_test(self, device):
        scaler = torch.GradScaler(device=device, init_scale=4.0)
        self.assertEqual(scaler.scale(torch.ones((), device=device)).item(), 4.0)
        self.assertEqual(type(scaler).__module__, "distscale.scaler")  # fails with torch's own

    def test_gradscaler_helper_missing(self, device):
        a_helper_this_torch_lacks()

    def test_something_else(self, device):
        raise AssertionError("not a grad-scaling test: never selected")
"""


def test_torch_suite_runs_the_selected_tests_with_each_class(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("expecttest", reason="torch's test utilities need it: pip install -e '.[dev]'")
    from bench import torch_suite

    path = tmp_path / "test_torch.py"
    path.write_text(_TORCH_STYLE_FILE)
    ours, missing = torch_suite.run(path, "distscale")
    theirs, _ = torch_suite.run(path, "torch")
    selected = {"test_grad_scaling_sees_the_class_under_test_cpu", "test_gradscaler_helper_missing_cpu"}
    assert set(ours) == set(theirs) == selected
    assert ours["test_grad_scaling_sees_the_class_under_test_cpu"] == "passed"
    assert theirs["test_grad_scaling_sees_the_class_under_test_cpu"].startswith("failed: AssertionError")
    assert ours["test_gradscaler_helper_missing_cpu"].startswith("error: NameError")
    assert len(missing) == 1 and "a_helper_this_torch_lacks" in missing[0]
    assert torch.GradScaler is torch.amp.GradScaler and torch.GradScaler.__module__ == "torch.amp.grad_scaler"
