"""`qwen2-train` with `task: sft` driven as a newcomer drives it: real subprocesses on 4 fake CPU devices,
a random tiny HF checkpoint saved by transformers (its tokenizer's chat template in
chat_template.jinja), a chat JSONL in TRL's three row shapes, a config file of their own.

The run trains (loss falls), logs what packing and truncation did, and its checkpoint directory holds
the tokenizer and chat template, so `qwen2-generate --chat` answers from it as it is; killed with
SIGKILL and rerun, it logs the unbroken run's losses bit for bit; a second run starts from the first
one's Orbax checkpoint; bad rows and bad keys exit 2 with one line naming the file, line and field,
before anything is compiled or written."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from test_train_cli import _env, _losses, _records, _start_and_signal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUESTIONS = [
    ("What does `decimal.Context.quantize` do?", "Returns a value equal to 'a' (rounded), having the exponent of 'b'."),
    ("What does `json.dumps` do?", "Serialize obj to a JSON formatted str."),
    ("What does `textwrap.dedent` do?", "Remove any common leading whitespace from every line in text."),
    ("What does `shutil.copy2` do?", "Copy data and metadata."),
    ("What does `os.path.join` do?", "Join two or more pathname components, inserting '/' as needed."),
    ("What does `heapq.heappush` do?", "Push item onto heap, maintaining the heap invariant."),
]


def _chat_rows():
    rows = []
    for i, (q, a) in enumerate(QUESTIONS):
        user, assistant = {"role": "user", "content": q}, {"role": "assistant", "content": a}
        rows.append({"messages": [user, assistant]})
        rows.append({"messages": [{"role": "system", "content": "Answer in one sentence."}, user, assistant]})
        rows.append({"prompt": [user], "completion": [assistant]})
        rows.append({"prompt": f"Q: {q}\nA:", "completion": f" {a}"})
        q2, a2 = QUESTIONS[(i + 1) % len(QUESTIONS)]
        second = [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": [user, assistant, *second]})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, hf_model_dir):
    """A chat JSONL and the run's config file, written as a user would."""
    path = tmp_path_factory.mktemp("sft")
    with open(path / "chat.jsonl", "w") as f:
        for row in _chat_rows():
            f.write(json.dumps(row) + "\n")
    config = {
        "task": "sft",
        "model": hf_model_dir,
        "batch_size": 4,
        "seq_len": 128,
        "total_steps": 10,
        "checkpoint_every": 4,
        "log_every": 1,
        "progress": False,
        "mesh": {"data": 4},
        "optimizer": {"learning_rate": 3e-2, "warmup_steps": 1},
        "loss": {"chunk_length": 32},
        "data": {"sources": [str(path / "chat.jsonl")], "cache_dir": str(path / "cache")},
    }
    (path / "sft.yaml").write_text(yaml.safe_dump(config))
    return path


def _command(workdir, output_dir, *overrides):
    cmd = [sys.executable, "-m", "train", "--config", str(workdir / "sft.yaml"), "--set", f"output_dir={output_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _run(cmd, timeout=600, stdin=None):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def unbroken_run(workdir):
    output_dir = str(workdir / "unbroken")
    result = _run(_command(workdir, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_sft_from_an_hf_checkpoint_trains_and_its_checkpoint_chats(unbroken_run):
    output_dir, stdout = unbroken_run
    losses = _losses(output_dir)
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 1.0, losses
    # 30 conversations (18 of them with a system turn or prompt), packed into rows of 128 tokens
    summary = [line for line in stdout.splitlines() if line.startswith("sft data:")]
    assert len(summary) == 1 and "30 conversations from 1 file(s)" in summary[0] and "packed" in summary[0]
    checkpoints = os.path.join(output_dir, "checkpoints")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(checkpoints))
    chat = _run(
        [sys.executable, "-m", "qwen2_jax", "--checkpoint", checkpoints, "--chat", "--max-new-tokens", "8"],
        stdin=QUESTIONS[0][0] + "\n",
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip(), chat.stdout


@pytest.mark.slow
def test_sigkill_then_rerun_logs_the_unbroken_losses(workdir, unbroken_run):
    """Slow: the resume path is covered by tests/test_train_cli.py::test_sigkill_then_rerun_logs_the_unbroken_losses
    (pretraining) and the SFT data stream's state by tests/test_train_sft_data.py."""
    unbroken = _losses(unbroken_run[0])
    output_dir = str(workdir / "killed")
    cmd = _command(workdir, output_dir)
    code, _, err = _start_and_signal(cmd, output_dir, signal.SIGKILL, after_step=6, need_checkpoint=4)
    assert code == -signal.SIGKILL, err[-2000:]
    assert 6 <= max(_losses(output_dir)) < 10
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert _losses(output_dir) == unbroken  # bit-identical on CPU
    assert len(_records(output_dir)) == 10


@pytest.mark.slow
def test_a_run_starts_from_an_orbax_checkpoint(workdir, unbroken_run):
    """Slow: the start from a checkpoint is covered by test_sft_from_an_hf_checkpoint_trains_and_its_checkpoint_chats
    (HF) and Orbax restores by tests/test_convert.py. `model:` the first run's own checkpoint directory: the
    second run starts from its trained weights
    (its first loss is the first run's late loss, not a random model's)."""
    first = _losses(unbroken_run[0])
    output_dir = str(workdir / "from-orbax")
    checkpoints = os.path.join(unbroken_run[0], "checkpoints")
    result = _run(_command(workdir, output_dir, f"model={checkpoints}", "total_steps=2", "checkpoint_every=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    second = _losses(output_dir)
    assert second[1] < first[1] - 1.0 and abs(second[1] - first[10]) < 1.0, (first, second)
    assert "chat_template.jinja" in os.listdir(os.path.join(output_dir, "checkpoints"))


BAD_ROWS = [
    ({"text": "plain text"}, "no 'messages' or 'prompt' field"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
        "messages[1].role: 'robot' is not a role the chat template knows",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        "messages[1].content: an empty assistant turn",
    ),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages: no assistant turn to learn from"),
]


@pytest.mark.parametrize("row,match", BAD_ROWS, ids=["no-messages", "unknown-role", "empty-assistant", "nothing"])
def test_bad_row_exits_2_naming_file_line_and_field(workdir, tmp_path, row, match):
    data = tmp_path / "bad.jsonl"
    good = json.dumps(_chat_rows()[0])
    data.write_text(f"{good}\n{good}\n{json.dumps(row)}\n")
    output_dir = tmp_path / "run"
    result = _run(_command(workdir, str(output_dir), f"data.sources=[{data}]"), timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"qwen2-train: error: {data}:3: ") and match in lines[0], lines[0]
    assert not os.path.exists(output_dir / "checkpoints")  # stopped before the model and its compile


@pytest.mark.parametrize(
    "override,match",
    [("task=rlhf", "config key 'task' must be one of pretrain, sft"), ("data.packng=false", "'data.packng'")],
)
def test_bad_key_exits_2_naming_it(workdir, tmp_path, override, match):
    result = _run(_command(workdir, str(tmp_path / "run"), override), timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr
