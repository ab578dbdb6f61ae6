"""Elastic resume: one run moved between device counts and process counts, each leg stopped by
SIGTERM and resumed by the next, logs the losses of a run that never moved.

    leg 1: 1 process x 8 devices, mesh data=2 x fsdp=4   (the reference's own layout)
    leg 2: 1 process x 4 devices, mesh data=2 x fsdp=2   (8 -> 4 devices: params and Adam moments
                                                           resharded by Orbax on restore)
    leg 3: 2 processes x 4 devices, mesh data=2 x fsdp=4 (4 -> 8 devices, 1 -> 2 processes)

What is compared: the training loss logged at every step, 1..10, against the reference run (1 process
x 8 devices, never stopped), and the held-out loss at steps 4 and 8. The steps of leg 1 agree exactly
(the same layout; leg 3's layout is bit-identical to the reference's too, see
test_train_multiprocess.py). On 4 devices the step is the same computation but not the same
arithmetic: fsdp=2 instead of 4 shards the parameters and gradients differently, so the reductions
add in another order and float32 results differ in the last bits, differences that then ride along
through the optimizer into leg 3. Measured: at most 9.5e-7 (one float32 ulp at these losses) over the
10 steps. The tolerance, ELASTIC_TOLERANCE = 1e-4, leaves 100x that for other CPUs' kernels, and is
far below the loss's change from one step to the next (>= 1e-2 here), the scale of what a wrong data
position (another batch) or a lost optimizer state would show. Longer runs need more: this tiny
model at learning rate 1e-2 is chaotic past ~20 steps, where one ulp grows to 1e-3.
"""

import pytest

from train_procs import (
    Job,
    checkpoint_steps,
    command,
    losses,
    records,
    reference_run,
    shared_cache_dir,
    tail,
    wait_for_step,
)

ELASTIC_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _leg(tmp_path, name, output_dir, cache_dir, mesh, *, processes, devices, stop_after=None):
    """Run (or resume) until `stop_after` is logged, then SIGTERM process 0; returns the last step."""
    cmd = command(output_dir, cache_dir, *mesh)
    job = Job(cmd, processes=processes, devices=devices, logs_dir=tmp_path / name)
    if stop_after is not None:
        assert wait_for_step(job, output_dir, stop_after), tail(job.wait(1))
        job.signal(0)
    results = job.wait(600)
    assert all(r.returncode == 0 for r in results), tail(results)
    step = max(r["step"] for r in records(output_dir))
    assert checkpoint_steps(output_dir)[-1] == step
    return step, results


@pytest.mark.slow
def test_8_devices_to_4_and_back_on_2_processes(tmp_path, cache_dir, reference):
    output_dir = str(tmp_path / "run")
    first, _ = _leg(
        tmp_path, "leg1", output_dir, cache_dir, ("mesh.data=2", "mesh.fsdp=4"), processes=1, devices=8, stop_after=2
    )
    assert first < 10
    second, results = _leg(
        tmp_path,
        "leg2",
        output_dir,
        cache_dir,
        ("mesh.data=2", "mesh.fsdp=2"),
        processes=1,
        devices=4,
        stop_after=first + 2,
    )
    assert f"from step {first}" in results[0].stdout and "data=2 x fsdp=2" in results[0].stdout
    assert first < second < 10
    last, results = _leg(
        tmp_path, "leg3", output_dir, cache_dir, ("mesh.data=2", "mesh.fsdp=4"), processes=2, devices=4
    )
    assert f"from step {second}" in results[0].stdout
    assert last == 10

    want, got = losses(reference), losses(output_dir)
    assert sorted(got) == list(range(1, 11))
    assert all(got[s] == want[s] for s in range(1, first + 1))  # leg 1: the reference's own layout
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= ELASTIC_TOLERANCE, {s: got[s] - want[s] for s in want}
    want_eval, got_eval = losses(reference, "eval_loss"), losses(output_dir, "eval_loss")
    assert sorted(got_eval) == [4, 8]
    assert max(abs(got_eval[s] - want_eval[s]) for s in want_eval) <= ELASTIC_TOLERANCE
