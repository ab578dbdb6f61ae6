"""qwen2-train as 2 real processes joined on loopback, 4 fake CPU devices each, against 1 process
with 8 on the same mesh (data=2 x fsdp=4), on configs/train/tiny-cpu.yaml shortened to 10 steps.

The 2 processes log the single process's loss at every step (within 1e-5; in fact bit for bit: both
add through gloo, see train/distributed.py); only process 0 logs. SIGTERM to one process stops both at
the same step with a checkpoint and exit 0, and the rerun resumes to the same losses; so does the
rerun after one process was SIGKILLed (the other exits non-zero at once). A failure on either process
(the coordinator or not) stops both, non-zero, with that process's message, within a bounded time.
Unit checks: the cluster detection and the flags that go together."""

import os
import signal
import time

import pytest

from train.distributed import detect_cluster
from train_procs import (
    REFERENCE_MESH,
    Job,
    checkpoint_steps,
    command,
    losses,
    max_difference,
    records,
    reference_run,
    run,
    shared_cache_dir,
    tail,
    wait_for_step,
)

TOLERANCE = 1e-5  # what the issue asks; the runs below agree exactly


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _two_processes(tmp_path, name, cache_dir, *overrides, extra=None, timeout=900):
    output_dir = str(tmp_path / name)
    cmd = command(output_dir, cache_dir, *REFERENCE_MESH, *overrides)
    return output_dir, run(
        cmd, processes=2, devices=4, logs_dir=tmp_path / f"{name}-logs", extra=extra, timeout=timeout
    )


def test_two_processes_log_the_single_process_losses(tmp_path, cache_dir, reference):
    output_dir, results = _two_processes(tmp_path, "two", cache_dir)
    assert [r.returncode for r in results] == [0, 0], tail(results)
    want, got = losses(reference), losses(output_dir)
    assert sorted(got) == list(range(1, 11))
    assert max_difference(want, got) <= TOLERANCE
    assert max_difference(losses(reference, "eval_loss"), losses(output_dir, "eval_loss")) <= TOLERANCE
    # bit for bit, in fact: without gloo in the single process, step 1 already differs by an ulp
    assert got == want
    assert checkpoint_steps(output_dir) == [4, 8, 10]
    # logs from process 0 only
    assert "qwen2-train: qwen2-0.5b" in results[0].stdout
    assert "qwen2-train" not in results[1].stdout


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_then_resumes(tmp_path, cache_dir, reference):
    output_dir = str(tmp_path / "run")
    cmd = command(output_dir, cache_dir, *REFERENCE_MESH)
    job = Job(cmd, processes=2, devices=4, logs_dir=tmp_path / "first")
    assert wait_for_step(job, output_dir, 2)
    job.signal(1)  # not the coordinator
    first = job.wait(300)
    assert [r.returncode for r in first] == [0, 0], tail(first)
    stopped = max(r["step"] for r in records(output_dir))
    assert stopped < 10 and checkpoint_steps(output_dir)[-1] == stopped
    assert f"SIGTERM on process 1: saved step {stopped}, stopping" in first[0].stdout

    second = run(cmd, processes=2, devices=4, logs_dir=tmp_path / "second")
    assert [r.returncode for r in second] == [0, 0], tail(second)
    assert f"resuming {output_dir} from step {stopped}" in second[0].stdout
    assert max_difference(losses(reference), losses(output_dir)) <= TOLERANCE


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_rerun_resumes(tmp_path, cache_dir, reference):
    """SIGKILL (no handler runs): the other process's next collective fails, it reports that and exits
    non-zero; the rerun of both resumes from the last complete checkpoint to the reference's losses."""
    output_dir = str(tmp_path / "run")
    cmd = command(output_dir, cache_dir, *REFERENCE_MESH)
    job = Job(cmd, processes=2, devices=4, logs_dir=tmp_path / "first")
    assert wait_for_step(job, output_dir, 5)
    killed_at = time.time()
    job.signal(1, signal.SIGKILL)
    first = job.wait(180)
    # stopped, not hung: ~40 s on a quiet 2-core machine, 78 s once in CI with the SSE4.2 numerics
    # running beside the slow tests (the survivor's in-flight step and shutdown share the CPUs)
    assert time.time() - killed_at < 120
    assert first[1].returncode == -signal.SIGKILL and first[0].returncode not in (0, None), tail(first)
    assert "qwen2-train: error: " in first[0].stderr
    resumed_from = checkpoint_steps(output_dir)[-1]

    second = run(cmd, processes=2, devices=4, logs_dir=tmp_path / "second")
    assert [r.returncode for r in second] == [0, 0], tail(second)
    assert f"resuming {output_dir} from step {resumed_from}" in second[0].stdout
    assert max_difference(losses(reference), losses(output_dir)) <= TOLERANCE


@pytest.mark.parametrize(
    "failing, overrides, message",
    [
        (1, ["--set", "data.sources=[/nonexistent/corpus.txt]"], "corpus not found: /nonexistent/corpus.txt"),
        (0, ["--set", "optimizer.learning_rate=fast"], "optimizer.learning_rate"),
    ],
    ids=["process-1-missing-corpus", "coordinator-bad-override"],
)
def test_a_failure_on_one_process_stops_both_with_its_message(tmp_path, cache_dir, failing, overrides, message):
    start = time.time()
    _, results = _two_processes(tmp_path, "run", cache_dir, extra={failing: overrides}, timeout=240)
    elapsed = time.time() - start
    assert not any(r.timed_out for r in results), tail(results)
    assert [r.returncode for r in results] == [2, 2], tail(results)
    assert elapsed < 180
    for r in results:
        assert message in r.stderr, tail(results)
    other = results[1 - failing].stderr
    assert f"qwen2-train: error: process {failing}: " in other, other[-2000:]
    assert "Traceback" not in other


def test_the_three_flags_go_together(tmp_path):
    results = run(
        [*command(tmp_path / "run", tmp_path / "cache"), "--num-processes", "2"],
        devices=1,
        logs_dir=tmp_path,
        timeout=120,
    )
    assert results[0].returncode == 2
    assert results[0].stderr.strip().splitlines() == [
        "qwen2-train: error: --coordinator-address, --num-processes and --process-id go together"
    ]


def test_cluster_detection_from_the_environment():
    slurm = dict(
        SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu[1-2]", SLURM_NTASKS="16", SLURM_PROCID="3", SLURM_LOCALID="3"
    )
    assert detect_cluster(slurm) == "slurm"
    assert detect_cluster(dict(slurm, SLURM_NTASKS="1")) is None  # one task: a single process
    assert detect_cluster({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None  # salloc, no srun
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert detect_cluster({"PATH": os.environ.get("PATH", "")}) is None  # this machine: no TPU
