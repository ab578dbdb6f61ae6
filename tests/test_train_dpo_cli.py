"""`qwen2-train` with `task: dpo` driven as a user drives it: real subprocesses on 4 fake CPU devices,
a random tiny HF checkpoint saved by transformers (with its tokenizer and chat template), preference
JSONL in TRL's standard and conversational formats, a config file of their own, `--set task=dpo`.

The run trains (the DPO loss falls from log 2, the chosen completions gain over the rejected ones),
logs TRL's reward metrics in metrics.jsonl and what packing and truncation did, and its checkpoint
directory chats (`qwen2-generate --chat`); bad rows and bad `dpo.*` keys exit 2 with one line before
anything is compiled or written. Slow: killed with SIGKILL and rerun, a run with a precomputed
reference logs the unbroken run's losses and metrics bit for bit."""

import json
import os
import signal
import sys

import pytest
import yaml

from test_train_cli import _records, _start_and_signal
from test_train_sft_cli import QUESTIONS, _run

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _pairs():
    rows = []
    for i, (q, a) in enumerate(QUESTIONS):
        wrong = QUESTIONS[(i + 1) % len(QUESTIONS)][1]
        user = [{"role": "user", "content": q}]
        rows.append(
            {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
        rows.append({"prompt": f"Q: {q}\nA:", "chosen": f" {a}", "rejected": f" {wrong}"})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, hf_model_dir):
    path = tmp_path_factory.mktemp("dpo")
    with open(path / "pairs.jsonl", "w") as f:
        for row in _pairs():
            f.write(json.dumps(row) + "\n")
    config = {  # task comes from --set, as the command line has it
        "model": hf_model_dir,
        "batch_size": 4,
        "seq_len": 128,
        "total_steps": 10,
        "checkpoint_every": 5,
        "log_every": 1,
        "progress": False,
        "mesh": {"data": 4},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1, "weight_decay": 0.0, "schedule": "constant"},
        "loss": {"chunk_length": 32},
        "dpo": {"beta": 0.1},
        "data": {"sources": [str(path / "pairs.jsonl")], "cache_dir": str(path / "cache")},
    }
    (path / "dpo.yaml").write_text(yaml.safe_dump(config))
    return path


def _command(workdir, output_dir, *overrides):
    cmd = [sys.executable, "-m", "train", "--config", str(workdir / "dpo.yaml"), "--set", "task=dpo"]
    for item in (f"output_dir={output_dir}", *overrides):
        cmd += ["--set", item]
    return cmd


@pytest.fixture(scope="module")
def unbroken_run(workdir):
    output_dir = str(workdir / "unbroken")
    result = _run(_command(workdir, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_dpo_from_an_hf_checkpoint_trains_logs_trl_metrics_and_chats(unbroken_run):
    output_dir, stdout = unbroken_run
    records = {r["step"]: r for r in _records(output_dir)}
    assert sorted(records) == list(range(1, 11))
    for record in records.values():
        assert set(METRICS) <= set(record), record
    first, last = records[1], records[10]
    assert abs(first["loss"] - 0.693147) < 1e-5 and abs(first["rewards/margins"]) < 1e-5  # reference = start
    assert last["loss"] < 0.6 and last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5, last
    summary = [line for line in stdout.splitlines() if line.startswith("dpo data:")]
    assert len(summary) == 1 and "12 pairs from 1 file(s)" in summary[0] and "0 cut, 0 dropped" in summary[0]
    assert "(log-probabilities computed in each step)" in stdout  # the default: the reference in every step
    checkpoints = os.path.join(output_dir, "checkpoints")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(checkpoints))
    chat = _run(
        [sys.executable, "-m", "qwen2_jax", "--checkpoint", checkpoints, "--chat", "--max-new-tokens", "8"],
        stdin=QUESTIONS[0][0] + "\n",
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip(), chat.stdout


@pytest.mark.parametrize(
    "precompute",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["reference-in-step", "precomputed"],
)
def test_dpo_with_lora_takes_the_base_with_adapters_off_as_its_reference(workdir, precompute):
    """A LoRA run's reference is its own frozen base with the adapters off (no second copy of the weights
    in the step): at step 1 the policy (B = 0) equals it, so the loss is log 2 and the margin 0. The
    precomputed case is slow: precomputing is covered by tests/test_train_dpo.py, the LoRA reference by
    the first case."""
    name = "lora-precomputed" if precompute else "lora"
    output_dir = str(workdir / name)
    sets = ("lora.rank=4", "lora.alpha=16", "total_steps=6", f"dpo.precompute_reference={str(precompute).lower()}")
    result = _run(_command(workdir, output_dir, *sets))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dpo reference: the LoRA base, adapters off" in result.stdout, result.stdout
    records = {r["step"]: r for r in _records(output_dir)}
    first, last = records[1], records[6]
    assert abs(first["loss"] - 0.693147) < 1e-5 and abs(first["rewards/margins"]) < 1e-5, first
    assert last["loss"] < first["loss"] and last["rewards/margins"] > 0, last
    adapter = os.path.join(output_dir, "checkpoints", "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))


@pytest.mark.parametrize(
    "row,override,match",
    [
        (
            {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
            None,
            "{data}:3: prompt, chosen, rejected: all strings or all message lists",
        ),
        ({"prompt": "Q", "chosen": " same", "rejected": " same"}, None, "{data}:3: rejected: equals chosen"),
        (None, "dpo.betta=0.2", "unknown config key 'dpo.betta' in section 'dpo'"),
    ],
    ids=["mixed-kinds", "chosen-equals-rejected", "unknown-dpo-key"],
)
def test_bad_input_exits_2_with_one_line(workdir, tmp_path, row, override, match):
    data = tmp_path / "bad.jsonl"
    good = json.dumps(_pairs()[0])
    data.write_text(f"{good}\n{good}\n{json.dumps(row)}\n" if row else f"{good}\n")
    output_dir = tmp_path / "run"
    sets = [f"data.sources=[{data}]"] + ([override] if override else [])
    result = _run(_command(workdir, str(output_dir), *sets), timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match.format(data=data) in lines[0], result.stderr
    assert not os.path.exists(output_dir / "checkpoints")  # stopped before the model and its compile


@pytest.mark.slow
def test_sigkill_then_rerun_with_a_precomputed_reference_logs_the_unbroken_run(workdir):
    """Slow: resuming is covered by tests/test_train_cli.py (pretraining); what DPO adds is the reference
    log-probabilities precomputed at each start, which must come out the same."""
    sets = (
        "dpo.precompute_reference=true",
        f"dpo.reference={yaml.safe_load((workdir / 'dpo.yaml').read_text())['model']}",
    )
    unbroken = str(workdir / "precomputed")
    result = _run(_command(workdir, unbroken, *sets))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "log-probabilities of" in result.stdout and "precomputed" in result.stdout
    output_dir = str(workdir / "killed")
    cmd = _command(workdir, output_dir, *sets)
    code, _, err = _start_and_signal(cmd, output_dir, signal.SIGKILL, after_step=6, need_checkpoint=5)
    assert code == -signal.SIGKILL, err[-2000:]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout

    def logged(path):
        return {r["step"]: {k: r[k] for k in ("loss", "grad_norm", *METRICS)} for r in _records(path)}

    assert logged(output_dir) == logged(unbroken)  # bit-identical on CPU
