"""`qwen2-train` with `task: sft` and a `lora:` section, as a user drives it: real subprocesses on 4 fake
CPU devices, the tiny HF checkpoint and chat JSONL of tests/test_train_sft_cli.py.

The run trains (loss falls), and its checkpoint directory holds the adapters (not the base) and a
PEFT adapter directory; killed with SIGKILL and rerun, it logs the unbroken run's losses bit for bit
(slow: tests/test_train_lora.py resumes an interrupted run in-process)."""

import os
import signal

import pytest

from qwen2_jax.config import Qwen2Config
from qwen2_jax.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter
from test_train_cli import _losses, _records, _start_and_signal
from test_train_sft_cli import _command, _run, workdir  # noqa: F401  (a module fixture)

LORA = ("lora.rank=8", "lora.alpha=16", "lora.dropout=0.05", "optimizer.learning_rate=5e-2")


@pytest.fixture(scope="module")
def lora_sft_run(workdir):  # noqa: F811
    output_dir = str(workdir / "lora-unbroken")
    result = _run(_command(workdir, output_dir, *LORA))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_lora_sft_trains_and_writes_a_peft_adapter(lora_sft_run, hf_model_dir):
    output_dir, stdout = lora_sft_run
    losses = _losses(output_dir)
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.2, losses  # the base (and its 151,680-row head) frozen: slower than full
    assert "LoRA rank 8" in stdout and "trained" in stdout
    checkpoints = os.path.join(output_dir, "checkpoints")
    assert sorted(os.listdir(os.path.join(checkpoints, "adapter"))) == [CONFIG_FILE, WEIGHTS_FILE]
    assert "params" not in os.listdir(os.path.join(checkpoints, "10"))
    lora_config, _ = load_peft_adapter(os.path.join(checkpoints, "adapter"), Qwen2Config.from_hf(hf_model_dir))
    assert (lora_config.rank, lora_config.alpha, lora_config.dropout) == (8, 16.0, 0.05)


@pytest.mark.slow
def test_sigkill_then_rerun_logs_the_unbroken_losses(workdir, lora_sft_run):  # noqa: F811
    unbroken = _losses(lora_sft_run[0])
    output_dir = str(workdir / "lora-killed")
    cmd = _command(workdir, output_dir, *LORA)
    code, _, err = _start_and_signal(cmd, output_dir, signal.SIGKILL, after_step=6, need_checkpoint=4)
    assert code == -signal.SIGKILL, err[-2000:]
    assert 6 <= max(_losses(output_dir)) < 10
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert _losses(output_dir) == unbroken  # bit-identical on CPU
    assert len(_records(output_dir)) == 10
