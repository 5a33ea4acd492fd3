"""Tier 4: the main job under real launchers (torchrun, mpirun, two network namespaces, Slurm).

Each test starts real processes; the summary line the job appends to ``--metrics`` is the oracle.
Tests that need a system tool name it in their skip reason; CI installs all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
sys.path.insert(0, str(REPO / "launch"))
import ckpt  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(cmd: list[str], timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole session (a launcher's workers too)."""
    start = time.monotonic()
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} timed out after {timeout:.0f} s\n{out[-3000:]}\n{err[-5000:]}"
        ) from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    proc.wall = time.monotonic() - start  # type: ignore[attr-defined]
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return proc


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        str(TRAIN),
        *args,
    ]


def records(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in lines if "summary" not in r]
    summaries = [r for r in lines if "summary" in r]
    assert summaries, f"no summary in {path}"
    return steps, summaries[-1]


def check_run(summary: dict, steps: list[dict], world: int) -> None:
    assert summary["world_size"] == world
    assert len(set(summary["scale_by_rank"])) == 1, f"ranks disagree on the scale: {summary['scale_by_rank']}"
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, "the loss did not fall"


@pytest.mark.parametrize("parallel", ["fsdp", "ddp", "pp"])
def test_torchrun_two_ranks(tmp_path, parallel):
    metrics = tmp_path / "m.jsonl"
    proc = run(torchrun("--parallel", parallel, "--steps", "40", "--no-progress", "--metrics", str(metrics)))
    steps, summary = records(metrics)
    check_run(summary, steps, 2)
    assert (
        summary["launcher"] == "torchrun" and summary["skipped_steps"] >= 1
    )  # the high first scale backs off
    assert "done: 40 steps on 2 rank(s)" in proc.stdout
    print(f"torchrun {parallel}: {proc.wall:.1f} s")  # type: ignore[attr-defined]


def test_pipeline_stages_with_fsdp2_on_four_ranks_resume_bitwise(tmp_path):
    """--parallel pp_fsdp: 2 stages, each sharded by FSDP2 over 2 ranks; a run checkpointed at
    step 6 and resumed in new processes ends with the uninterrupted run's model, scale and loss."""
    common = ("--parallel", "pp_fsdp", "--steps", "12", "--no-progress")
    whole = tmp_path / "whole.jsonl"
    proc = run(torchrun(*common, "--metrics", str(whole), nproc=4))
    steps, want = records(whole)
    check_run(want, steps, 4)
    assert want["skipped_steps"] >= 1 and "done: 12 steps on 4 rank(s) (torchrun, pp_fsdp)" in proc.stdout
    root = tmp_path / "ckpt"
    run(torchrun(*common[:3], "6", "--no-progress", "--ckpt-dir", str(root), nproc=4))
    resumed = tmp_path / "resumed.jsonl"
    run(torchrun(*common, "--metrics", str(resumed), "--resume", str(root / "step_00000006"), nproc=4))
    got = records(resumed)[1]
    assert got["resumed_from"] == 6
    assert (got["model_sha256"], got["scale"], got["final_loss"]) == (
        want["model_sha256"],
        want["scale"],
        want["final_loss"],
    )


def test_single_process_runs_unchanged(tmp_path):
    metrics = tmp_path / "m.jsonl"
    run([sys.executable, str(TRAIN), "--steps", "40", "--no-progress", "--metrics", str(metrics)])
    steps, summary = records(metrics)
    check_run(summary, steps, 1)
    assert summary["launcher"] == "single"


def test_killed_rank_restarts_from_checkpoint_bitwise(tmp_path):
    common = ("--steps", "12", "--no-progress", "--clip", "1.0")
    whole = tmp_path / "whole.jsonl"
    run(torchrun(*common, "--metrics", str(whole)))
    faulty = tmp_path / "faulty.jsonl"
    proc = run(
        torchrun(
            *common,
            "--metrics",
            str(faulty),
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--ckpt-every",
            "3",
            "--resume",
            "auto",
            "--inject-failure",
            "7:1",  # SIGKILL rank 1 at step 7, first attempt only
            extra=("--max-restarts=1",),
        )
    )
    _, want = records(whole)
    steps, got = records(faulty)
    assert got["resumed_from"] == 6, got
    assert got["model_sha256"] == want["model_sha256"], "restarted run differs from the uninterrupted one"
    assert got["scale"] == want["scale"] and got["final_loss"] == want["final_loss"]
    assert [r["step"] for r in steps].count(6) == 2  # step 6 ran, was lost with the kill, ran again
    assert "resumed from" in proc.stdout


def test_faults_are_skipped_by_reason_named_and_stop_the_job_with_a_checkpoint(tmp_path):
    """The main job with fault injection and the skip rules: rank 1's batch is noise at step 25 (a
    loss spike), its gradients NaN from step 40 (two overflows, then a suspected fault that stops
    every rank with exit code 3 and a checkpoint); the job resumes from it once the fault is gone."""
    metrics, ckpt_dir = tmp_path / "m.jsonl", tmp_path / "ckpt"
    common = ("--parallel", "ddp", "--steps", "50", "--no-progress", "--metrics", str(metrics))
    rules = ("--skip-loss-sigma", "6", "--spike-window", "10", "--spike-warmup", "10", "--on-fault", "raise")
    faults = ("--corrupt-batch", "1:25", "--inject-nan", "1:40")
    proc = run(torchrun(*common, *rules, *faults, "--ckpt-dir", str(ckpt_dir)), check=False)
    assert proc.returncode != 0
    assert "stopped: step 42: suspected fault (lone_rank" in proc.stderr and "rank 1 on host" in proc.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    reasons = {r["step"]: r["skip_reason"] for r in lines if r.get("skipped")}
    assert reasons[25] == 3 and reasons[40] == reasons[41] == 1, reasons  # loss spike; overflows
    assert [r["loss_spikes"] for r in lines][-1] == 1 and lines[-1]["step"] == 41
    assert sorted(p.name for p in ckpt_dir.iterdir())[-1] == "step_00000043"
    # The device replaced: the job resumes after the fault's step and finishes.
    run(torchrun(*common, *rules, "--ckpt-dir", str(ckpt_dir), "--resume", "auto"))
    _, summary = records(metrics)
    assert summary["resumed_from"] == 43 and len(set(summary["scale_by_rank"])) == 1
    assert summary["replicas_equal"] and summary["skipped_by_reason"]["suspected_faults"] == 1


def _save_checkpoints(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    run(
        [
            sys.executable,
            str(TRAIN),
            "--steps",
            "6",
            "--no-progress",
            "--ckpt-dir",
            str(root),
            "--ckpt-every",
            "2",
        ]
    )
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004", "step_00000006"]  # keep=2
    return root


def _shard(step_dir: Path) -> Path:
    return next(p for p in sorted(step_dir.iterdir()) if p.suffix == ".distcp")


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_checkpoint_fails_clearly_and_previous_stays_intact(tmp_path, damage):
    root = _save_checkpoints(tmp_path)
    latest = root / "step_00000006"
    if damage == "truncate":
        shard = _shard(latest)
        shard.write_bytes(shard.read_bytes()[:-100])
        expected = "is truncated"
    elif damage == "flip":
        shard = _shard(latest)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "fails its sha256 check"
    else:
        (latest / ckpt.MANIFEST).write_text("{not json")
        expected = "is corrupt"
    proc = run(
        [
            sys.executable,
            str(TRAIN),
            "--steps",
            "8",
            "--no-progress",
            "--ckpt-dir",
            str(root),
            "--resume",
            "auto",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr and "step_00000004 is intact: resume from it" in proc.stderr, proc.stderr[
        -2000:
    ]
    ckpt.verify(root / "step_00000004")  # the previous checkpoint still verifies
    run(
        [sys.executable, str(TRAIN), "--steps", "8", "--no-progress", "--resume", str(root / "step_00000004")]
    )


def test_interrupted_save_is_ignored(tmp_path):
    root = _save_checkpoints(tmp_path)
    partial = root / ".tmp-step_00000008-deadbeef"  # what a crash in the middle of a save leaves
    shutil.copytree(root / "step_00000006", partial)
    (partial / ckpt.MANIFEST).unlink()
    assert ckpt.resolve("auto", root) == root / "step_00000006"


def test_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    root = tmp_path / "ckpt"
    two = tmp_path / "two.jsonl"
    run(
        torchrun(
            "--steps",
            "20",
            "--no-progress",
            "--metrics",
            str(two),
            "--ckpt-dir",
            str(root),
            "--ckpt-every",
            "15",
        )
    )
    steps2, sum2 = records(two)
    # (a) The FSDP2 state written by 2 ranks loads bitwise on 1 rank: zero steps left to train,
    # so the 1-rank model digest must equal the 2-rank one.
    same = tmp_path / "same.jsonl"
    run([sys.executable, str(TRAIN), "--steps", "20", "--no-progress", "--metrics", str(same),
         "--resume", str(root / "step_00000020")])  # fmt: skip
    assert records(same)[1]["model_sha256"] == sum2["model_sha256"]
    # (b) Training on from step 15 on 1 rank: same data, same math, another reduction order, so
    # the first resumed step agrees to rounding (later steps may drift, and an fp16 overflow
    # decision can flip, so they are not compared).
    one = tmp_path / "one.jsonl"
    run([sys.executable, str(TRAIN), "--steps", "17", "--no-progress", "--metrics", str(one),
         "--resume", str(root / "step_00000015")])  # fmt: skip
    steps1, sum1 = records(one)
    assert sum1["resumed_from"] == 15 and sum1["world_size"] == 1
    first2, first1 = steps2[15], steps1[0]
    assert first1["step"] == first2["step"] == 15
    assert abs(first1["loss"] - first2["loss"]) < 1e-4 and first1["scale"] == first2["scale"], (
        first1,
        first2,
    )


@pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="needs Open MPI's mpirun (apt-get install openmpi-bin)"
)
def test_mpirun_two_ranks(tmp_path):
    pytest.importorskip("mpi4py", reason="needs mpi4py (pip install 'distscale[mpi]')")
    metrics = tmp_path / "m.jsonl"
    proc = run(["bash", str(REPO / "launch" / "mpirun.sh"), "--parallel", "ddp", "--steps", "40", "--no-progress",
                "--metrics", str(metrics)])  # fmt: skip
    steps, summary = records(metrics)
    check_run(summary, steps, 2)
    assert summary["launcher"] == "mpi"
    print(f"mpirun: {proc.wall:.1f} s")  # type: ignore[attr-defined]


def _can_make_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (apt-get install iproute2)"
    return None


@pytest.mark.skipif(_can_make_netns() is not None, reason=str(_can_make_netns()))
def test_two_nodes_in_network_namespaces(tmp_path):
    """Two "hosts" (network namespaces joined by a veth pair), one torchrun agent each, c10d rendezvous."""
    tag = uuid.uuid4().hex[:6]
    ns = [f"ds{tag}a", f"ds{tag}b"]
    dev = [f"v{tag}a", f"v{tag}b"]
    addr = ["10.213.77.1", "10.213.77.2"]  # inside the test's own namespaces only
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        for name in ns:
            sh("ip", "netns", "add", name)
        sh("ip", "link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for i in range(2):
            sh("ip", "link", "set", dev[i], "netns", ns[i])
            sh("ip", "-n", ns[i], "addr", "add", f"{addr[i]}/30", "dev", dev[i])
            sh("ip", "-n", ns[i], "link", "set", dev[i], "up")
            sh("ip", "-n", ns[i], "link", "set", "lo", "up")
        metrics = tmp_path / "m.jsonl"
        procs = []
        for i in range(2):
            cmd = [
                "ip", "netns", "exec", ns[i], "env", f"GLOO_SOCKET_IFNAME={dev[i]}",
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={addr[0]}:29555", f"--rdzv-id={tag}",
                # Both namespaces share one hostname: say which node hosts the rendezvous store.
                f"--rdzv-conf=is_host={int(i == 0)}", f"--local-addr={addr[i]}",
                str(TRAIN), "--steps", "30", "--no-progress", *(["--metrics", str(metrics)] if i == 0 else []),
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outputs = [p.communicate(timeout=240) for p in procs]
        for p, (out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, f"node exited {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
        steps, summary = records(metrics)
        check_run(summary, steps, 2)
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


CLUSTER = REPO / "slurm" / "local_cluster.sh"
NODES = ["dsnode1", "dsnode2"]
SLURM_STEPS = 60  # every two-node job here: the template's defaults (2 nodes x 2 tasks, FSDP2)


def _cluster_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


@pytest.fixture(scope="module")
def local_slurm():
    """A two-node Slurm cluster on this machine (slurm/local_cluster.sh): used as is when one runs
    (.ci/run starts it), else started here and stopped after the module."""
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip(
            "needs root and Debian's slurmctld/slurmd/munge (apt-get install slurmctld slurmd slurm-client munge)"
        )
    started = _cluster_nodes() != NODES
    if started:
        proc = subprocess.run(
            ["bash", str(CLUSTER), "start", "2"], capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"local_cluster.sh start 2 failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=60)


def _sbatch(tmp_path: Path, ckpt_dir: Path, metrics: Path, *options: str, env: str = ""):
    cmd = ["sbatch", "--wait", "--time=00:10:00",
           f"--output={tmp_path / 'job-%j.out'}", f"--export=ALL,STEPS={SLURM_STEPS},CKPT_DIR={ckpt_dir}{env}",
           *options, str(REPO / "slurm" / "train.sbatch"), "--metrics", str(metrics)]  # fmt: skip
    proc = run(cmd, check=False, timeout=400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr}\n{logs[-4000:]}"
    return proc, logs


@pytest.fixture(scope="module")
def single_node_reference(tmp_path_factory):
    """The same job (4 ranks, FSDP2, the template's arguments) on one node, with torchrun."""
    root = tmp_path_factory.mktemp("reference")
    metrics = root / "m.jsonl"
    run(torchrun("--steps", str(SLURM_STEPS), "--ckpt-dir", str(root / "ckpt"), "--ckpt-every", "20",
                 "--resume", "auto", "--no-progress", "--metrics", str(metrics), nproc=4))  # fmt: skip
    return records(metrics)[1]


def _check_two_nodes(summary: dict, reference: dict) -> None:
    assert summary["world_size"] == 4
    hosts, addresses = summary["host_by_rank"], summary["address_by_rank"]
    # Two ranks on each node; each node its own hostname and address (its namespaces), and the
    # summary's gather crossed between them.
    assert sorted(hosts) == ["dsnode1", "dsnode1", "dsnode2", "dsnode2"], hosts
    assert {h: a for h, a in zip(hosts, addresses, strict=True)} == {
        "dsnode1": "10.77.0.11",
        "dsnode2": "10.77.0.12",
    }
    assert summary["model_sha256"] == reference["model_sha256"], "two nodes differ from one node"
    assert summary["scale"] == reference["scale"] and len(set(summary["scale_by_rank"])) == 1


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_sbatch_on_two_nodes_with_the_templates_defaults(tmp_path, local_slurm, single_node_reference, mode):
    metrics = tmp_path / "m.jsonl"
    _, logs = _sbatch(tmp_path, tmp_path / "ckpt", metrics, env=f",LAUNCH_MODE={mode}")
    steps, summary = records(metrics)
    check_run(summary, steps, 4)
    assert summary["launcher"] == ("slurm" if mode == "srun" else "torchrun")
    assert "2 node(s) [dsnode[1-2]]" in logs, logs[-2000:]
    _check_two_nodes(summary, single_node_reference)
    assert ckpt.complete_checkpoints(tmp_path / "ckpt"), "the job wrote no checkpoint"


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def _wait_job(job_id: str, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True)
            raise AssertionError(
                f"job {job_id}: {what} within {timeout:.0f} s (state {_job_field(job_id, 'JobState')})"
            )
        time.sleep(0.5)


def _submit(tmp_path: Path, ckpt_dir: Path, metrics: Path, steps: int = SLURM_STEPS) -> str:
    return run(
        ["sbatch", "--parsable", "--time=00:10:00", f"--output={tmp_path / 'job-%j.out'}",
         f"--export=ALL,STEPS={steps},CKPT_DIR={ckpt_dir}", str(REPO / "slurm" / "train.sbatch"),
         "--metrics", str(metrics)],
    ).stdout.strip().split(";")[0]  # fmt: skip


def _node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout
    return out.strip()


def _run_requeued(job_id: str) -> None:
    """Wait for the requeued job to run again and complete. Slurm holds a requeued job for
    cred_expire (90 s here) and refuses to start it earlier ("Job credential revoked", when forced
    within a second of the requeue): it is left to start on its own."""
    requeued = lambda: _job_field(job_id, "Restarts") == "1" and _job_field(job_id, "JobState") == "PENDING"  # noqa: E731
    _wait_job(job_id, requeued, 90, "not requeued")
    _wait_job(job_id, lambda: _job_field(job_id, "JobState") in ("COMPLETED", "FAILED"), 360, "not finished")
    assert _job_field(job_id, "JobState") == "COMPLETED"


@pytest.mark.timeout(600)
def test_lost_node_requeues_and_resumes_bitwise(tmp_path, local_slurm, single_node_reference):
    """A node dies mid-run (its slurmd and every process on it, SIGKILL): Slurm marks it down and
    requeues the job; with the node back, the job resumes from the last complete checkpoint on the
    shared directory and ends as the uninterrupted run does."""
    metrics, ckpt_dir = tmp_path / "m.jsonl", tmp_path / "ckpt"
    job_id = _submit(tmp_path, ckpt_dir, metrics)
    _wait_job(job_id, lambda: bool(ckpt.complete_checkpoints(ckpt_dir)), 180, "no checkpoint")
    killed = run(["bash", str(CLUSTER), "kill-node", "dsnode2"]).stdout
    assert "killed" in killed and not killed.startswith("killed 0 "), killed
    # Slurm finds the node silent (SlurmdTimeout), marks it down and requeues the job.
    _wait_job(job_id, lambda: _node_state("dsnode2").startswith("down"), 90, "dsnode2 not marked down")
    _wait_job(
        job_id, lambda: _job_field(job_id, "Restarts") == "1", 30, "not requeued after the node failure"
    )
    _wait_job(
        job_id, lambda: _job_field(job_id, "JobState") == "PENDING", 60, "the failed run not cleaned up"
    )
    # The machine comes back while Slurm holds the requeued job (cred_expire, 90 s here: long enough
    # for the failed run's retried kill requests to reach the revived node before the new run does);
    # its slurmd registers, the node returns to service, and the job starts when the hold ends.
    run(["bash", str(CLUSTER), "revive-node", "dsnode2"])
    _wait_job(job_id, lambda: _node_state("dsnode2") == "idle", 60, "dsnode2 not back in service")
    _run_requeued(job_id)
    steps, summary = records(metrics)
    assert summary["resumed_from"] >= 20 and steps[-1]["step"] == SLURM_STEPS - 1
    _check_two_nodes(summary, single_node_reference)
    assert summary["final_loss"] == single_node_reference["final_loss"]


@pytest.mark.timeout(600)
def test_sbatch_requeue_on_preemption_resumes_from_checkpoint(tmp_path, local_slurm):
    """SIGUSR1 (what Slurm sends before preemption or the time limit) requeues the two-node job,
    which resumes."""
    metrics, ckpt_dir = tmp_path / "m.jsonl", tmp_path / "ckpt"
    job_id = _submit(tmp_path, ckpt_dir, metrics, steps=150)
    _wait_job(job_id, lambda: bool(ckpt.complete_checkpoints(ckpt_dir)), 180, "no checkpoint")
    run(["scancel", "--signal=USR1", "--batch", job_id])
    _run_requeued(job_id)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert "requeueing job" in logs and "resumed from" in logs, logs[-3000:]
    steps, summary = records(metrics)
    assert summary["resumed_from"] >= 20 and steps[-1]["step"] == 149
    assert len(set(summary["scale_by_rank"])) == 1 and sorted(set(summary["host_by_rank"])) == NODES
