"""Launch detection from plain dicts: no cluster needed."""

from __future__ import annotations

import pytest

from distscale.env import DistEnv, LaunchError, detect_env, expand_nodelist


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("gpu[01-04,07],cpu-a1", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu-a1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("a[1],b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("host-1.example.org", ["host-1.example.org"]),
        ("x[ 1 - 2 ]".replace(" ", ""), ["x1", "x2"]),
        ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu01-04]", "n[a-b]", "n[5-3]", "", "n[]"])
def test_bad_nodelists_name_the_list(bad):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(bad)


def test_single_process_when_nothing_is_set():
    assert detect_env({"HOME": "/root"}) == DistEnv(launcher="single", rank=0, world_size=1, local_rank=0)


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    assert detect_env(env) == DistEnv(
        launcher="torchrun", rank=3, world_size=4, local_rank=1, master_addr="head", master_port=29500
    )


def test_torchrun_inside_slurm_wins():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
    }
    assert detect_env(env).launcher == "torchrun"


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_torchrun_missing_variable_is_named(missing):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    del env[missing]
    with pytest.raises(LaunchError, match=rf"missing .*{missing}.*HINT"):
        detect_env(env)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"RANK": "2"}, r"rank must be in \[0, 2\), got 2"),
        ({"WORLD_SIZE": "0"}, "world size must be >= 1"),
        ({"RANK": "x"}, "RANK must be an integer, got 'x'"),
        ({"LOCAL_RANK": "-1"}, "local rank"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT must be in"),
    ],
)
def test_torchrun_contradictions(overrides, match):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match=match):
        detect_env({**env, **overrides})


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-10]",
}


def test_slurm_srun_task():
    env = detect_env(SLURM)
    assert env == DistEnv(
        launcher="slurm", rank=5, world_size=8, local_rank=1, master_addr="gpu07", master_port=15000 + 4242
    )


def test_slurm_step_values_win_and_master_overrides():
    env = detect_env(
        {**SLURM, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "b[2-3]", "MASTER_PORT": "2222"}
    )
    assert (env.world_size, env.master_addr, env.master_port) == (6, "b2", 2222)
    assert detect_env({**SLURM, "MASTER_ADDR": "10.1.2.3"}).master_addr == "10.1.2.3"


def test_slurm_batch_step_is_not_a_task():
    # The batch script itself has SLURM_PROCID=0 but is no srun step: one process.
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert detect_env(batch).launcher == "single"


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID"])
def test_slurm_missing_variable_is_named(missing):
    env = dict(SLURM)
    del env[missing]
    with pytest.raises(LaunchError, match=rf"{missing}.*HINT: launch the tasks with srun"):
        detect_env(env)


def test_slurm_without_nodelist_or_master():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(LaunchError, match="MASTER_ADDR nor SLURM_STEP_NODELIST"):
        detect_env(env)


def test_slurm_rank_beyond_ntasks():
    with pytest.raises(LaunchError, match=r"slurm: rank must be in \[0, 8\), got 9"):
        detect_env({**SLURM, "SLURM_PROCID": "9"})


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert detect_env(env) == DistEnv(launcher="mpi", rank=2, world_size=4, local_rank=0)
    assert detect_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "5"}).master_port == 5


def test_mpich_pmi():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    assert detect_env(env) == DistEnv(launcher="mpi", rank=1, world_size=2, local_rank=1)


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
        ({"PMI_RANK": "0", "MPI_LOCALRANKID": "0"}, "PMI_SIZE"),
    ],
)
def test_mpi_missing_variable_is_named(env, missing):
    with pytest.raises(LaunchError, match=rf"MPI launch is missing {missing}. HINT"):
        detect_env(env)


def test_mpi_contradiction():
    env = {"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    with pytest.raises(LaunchError, match=r"mpi: rank must be in \[0, 4\), got 4"):
        detect_env(env)
