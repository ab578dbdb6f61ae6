"""qwen2-train driven as a user drives it: real subprocesses of `python -m train --config
configs/train/tiny-cpu.yaml --set ...` on 4 fake CPU devices (XLA_FLAGS), the built-in corpus.

Killed with SIGKILL after step 6 and rerun, the run logs the unbroken run's loss at every step; the
loss falls within 12 steps; SIGTERM saves and exits 0, and the rerun finishes with the same losses;
an fsdp x tensor mesh gives the data-parallel losses; bad input exits 2 with one line on stderr."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xla_env import run_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "train", "tiny-cpu.yaml")
DEVICES = 4


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = run_xla_flags(DEVICES)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One prepared copy of the built-in corpus for every run of this module."""
    return str(tmp_path_factory.mktemp("data-cache"))


def _command(output_dir, cache_dir, *overrides):
    sets = [
        f"output_dir={output_dir}",
        f"data.cache_dir={cache_dir}",
        "total_steps=12",
        "checkpoint_every=5",
        "log_every=1",
        "eval_every=6",
        "eval_batches=2",
        "seq_len=64",
        "loss.chunk_length=32",
        "progress=false",
        "mesh.data=4",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "train", "--config", CONFIG]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _records(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _losses(output_dir):
    return {r["step"]: r["loss"] for r in _records(output_dir)}


def _start_and_signal(cmd, output_dir, sig, after_step, need_checkpoint=None, timeout=600):
    """Start a run, send `sig` once `after_step` is logged (and checkpoint `need_checkpoint` is complete)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            steps = [r["step"] for r in _records(output_dir)]
            ready = need_checkpoint is None or os.path.isdir(
                os.path.join(output_dir, "checkpoints", str(need_checkpoint))
            )
            if steps and max(steps) >= after_step and ready:
                proc.send_signal(sig)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory, cache_dir):
    output_dir = str(tmp_path_factory.mktemp("unbroken") / "run")
    result = _run(_command(output_dir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def unbroken(unbroken_run):
    return _losses(unbroken_run)


def test_loss_falls_within_12_steps_with_metrics_and_eval(unbroken_run, unbroken):
    assert sorted(unbroken) == list(range(1, 13))
    assert unbroken[12] < unbroken[1] - 1.0, unbroken
    records = {r["step"]: r for r in _records(unbroken_run)}
    for record in records.values():
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed"} <= set(record)
    assert {s for s, r in records.items() if "eval_loss" in r} == {6, 12}
    assert records[12]["eval_loss"] < records[6]["eval_loss"]
    assert abs(records[12]["eval_perplexity"] - math.exp(records[12]["eval_loss"])) < 1e-3
    events = os.listdir(os.path.join(unbroken_run, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_checkpoint_loads_for_generation_and_converts_to_hf(unbroken_run, tmp_path, caplog):
    import qwen2_jax

    checkpoints = os.path.join(unbroken_run, "checkpoints")
    with caplog.at_level("WARNING"):
        config, params = qwen2_jax.load_checkpoint(checkpoints)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text  # a clean load says nothing
    assert config.num_hidden_layers == 2 and config.vocab_size == 151936
    assert len(qwen2_jax.generate(config, params, [[9707, 11, 1879]], 3)[0]) == 3
    hf_dir = str(tmp_path / "hf")
    result = _run([sys.executable, "-m", "convert", "orbax-to-hf", checkpoints, hf_dir, "--quiet"])
    assert result.returncode == 0, result.stderr
    hf_config, hf_params = qwen2_jax.load_checkpoint(hf_dir)
    assert hf_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_then_rerun_logs_the_unbroken_losses(tmp_path, cache_dir, unbroken):
    output_dir = str(tmp_path / "run")
    cmd = _command(output_dir, cache_dir)
    code, _, err = _start_and_signal(cmd, output_dir, signal.SIGKILL, after_step=7, need_checkpoint=5)
    assert code == -signal.SIGKILL, err[-2000:]
    killed_at = max(_losses(output_dir))
    assert 7 <= killed_at < 12
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout, result.stdout
    resumed = _losses(output_dir)
    assert resumed == unbroken  # bit-identical on CPU
    assert len(_records(output_dir)) == 12  # one record per step: the killed run's extra ones were cut


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_rerun_finishes_identically(tmp_path, cache_dir, unbroken):
    output_dir = str(tmp_path / "run")
    cmd = _command(output_dir, cache_dir)
    code, out, err = _start_and_signal(cmd, output_dir, signal.SIGTERM, after_step=3)
    assert code == 0, err[-2000:]
    stopped = max(_losses(output_dir))
    assert stopped < 12
    assert os.path.isdir(os.path.join(output_dir, "checkpoints", str(stopped)))  # saved where it stopped
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from step {stopped}" in result.stdout
    assert _losses(output_dir) == unbroken


@pytest.mark.slow
def test_fsdp_tensor_mesh_gives_the_data_parallel_losses(tmp_path, cache_dir, unbroken):
    output_dir = str(tmp_path / "run")
    result = _run(_command(output_dir, cache_dir, "total_steps=12", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = _losses(output_dir)
    assert sorted(sharded) == sorted(unbroken)
    for step, loss in unbroken.items():
        assert abs(sharded[step] - loss) <= 1e-4, (step, sharded[step], loss)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("optimizer.beta1=0.9",), "'optimizer.beta1'"),
        (("total_steps=many",), "'total_steps'"),
        (("mesh.data=3",), "needs 3 devices"),
        (("batch_size=6",), "not divisible by the data-parallel"),
        (("data.sources=[/no/such/corpus.txt]",), "corpus not found"),
        (("model=/no/such/config.json",), "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, cache_dir, overrides, match):
    result = _run(_command(str(tmp_path / "run"), cache_dir, *overrides), timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qwen2-train: error:") and match in lines[0], lines[0]


def test_resuming_with_another_model_exits_2_and_keeps_the_checkpoint_loadable(unbroken_run, tmp_path, cache_dir):
    """The run's checkpoints describe their model in config.json: a rerun with another architecture must
    name the difference in one line, before it rewrites that file or touches the arrays."""
    import shutil

    import qwen2_jax

    output_dir = str(tmp_path / "run")
    shutil.copytree(unbroken_run, output_dir)
    result = _run(_command(output_dir, cache_dir, "model_overrides.hidden_size=128"), timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another model (hidden_size 64 there, 128 now)" in lines[0], result.stderr
    config, _ = qwen2_jax.load_checkpoint(os.path.join(output_dir, "checkpoints"))
    assert config.hidden_size == 64


def test_missing_config_file_exits_2(tmp_path):
    result = _run([sys.executable, "-m", "train", "--config", str(tmp_path / "nope.yaml")], timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_tiny_moe_trains_with_expert_parallelism(tmp_path, cache_dir):
    output_dir = str(tmp_path / "moe")
    cmd = [sys.executable, "-m", "train", "--config", os.path.join("configs", "train", "tiny-moe-cpu.yaml")]
    for s in (
        f"output_dir={output_dir}",
        f"data.cache_dir={cache_dir}",
        "total_steps=8",
        "seq_len=64",
        "eval_every=0",
        "progress=false",
    ):
        cmd += ["--set", s]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "expert=4" in result.stdout
    records = _records(output_dir)
    assert len(records) == 8 and all(r["aux_loss"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
