"""`make demo-post` (qwen2_jax.demo.post): SFT then DPO of the demo's model, held-out preference accuracy.

Fast: the data split (held-out names never in a training row), the pairs, the scorer's completion
boundaries, a --base that is no demo run. Slow (five training and generation subprocesses, minutes on 2
cores): the whole post-training demo from nothing with 4 steps per training run (the accuracy bars
off): every stage runs, the three accuracies are printed, a held-out question is answered; then, reusing
its base model, the same demo with the bar out of reach exits 1 at stage 'dpo'.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from qwen2_jax.demo import post, qa_pairs
from qwen2_jax.demo.preference_eval import encode_completion
from xla_env import run_xla_flags


def test_held_out_names_are_in_no_training_row():
    split = qa_pairs.split(qa_pairs.decimal_exchanges())
    assert len(split.held_out) >= 20 and len(split.train) >= 4 * len(split.held_out) - 4
    held = {e.name for e in split.held_out}
    assert not held & {e.name for e in split.train}
    rows = [qa_pairs.chat_row(e) for e in split.train]
    rows += [qa_pairs.preference_row(e, r) for e, r in qa_pairs.preference_pairs(split.train)]
    text = json.dumps(rows)
    assert not [name for name in held if f"`{name}`" in text]
    assert all(e.name.startswith("decimal.") for e in split.train + split.held_out)


def test_a_pair_rejects_the_answer_of_another_kind_of_name():
    split = qa_pairs.split(qa_pairs.decimal_exchanges())
    pairs = qa_pairs.preference_pairs(split.held_out)
    assert len(pairs) == len(split.held_out)
    answers = {x.answer: x for x in split.held_out}
    assert all(rejected != e.answer and rejected in answers for e, rejected in pairs)
    assert all(qa_pairs.kind(answers[rejected]) != qa_pairs.kind(e) for e, rejected in pairs)
    assert len({rejected for _, rejected in pairs}) > len(pairs) // 2  # spread, not one answer repeated
    assert {qa_pairs.kind(e) for e in split.held_out} == {"Decimal", "Context", "other"}


def test_the_completion_is_the_assistant_turn(tok_dir):
    from qwen2_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    ids, start = encode_completion(tok, "What does `decimal.Context.abs` do?", "Returns the absolute value.")
    assert tok.decode(ids[start:]) == "Returns the absolute value.<|im_end|>\n"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_base_that_is_not_a_demo_run_is_refused(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert post.main(["--base", str(tmp_path)]) == 2
    assert "holds no finished demo run" in capsys.readouterr().err


ACCURACY = re.compile(r"held-out preference accuracy, (base|after SFT|after DPO): (\d\.\d\d) \((\d+)/(\d+) pairs")


def _demo_post(out, *extra, min_accuracy=0.0):
    # one CPU device, as a user has (conftest sets 8 fake ones), compiled as every test process compiles
    env = dict(os.environ, XLA_FLAGS=run_xla_flags(1))
    code = (  # the base model of 4 steps learns little: its own bar off too
        "import sys; from qwen2_jax.demo import pipeline, post; pipeline.LEARNED_MARGIN = -10.0; "
        f"post.MIN_ACCURACY = {min_accuracy}; sys.exit(post.main(sys.argv[1:]))"
    )
    argv = ["--keep", str(out), "--base-steps", "4", "--sft-steps", "4", "--dpo-steps", "4", *extra]
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The demo from nothing with 4 steps per training run (the accuracy bar off): (directory, process)."""
    out = tmp_path_factory.mktemp("demo-post") / "post"
    return out, _demo_post(out)


@pytest.mark.slow
def test_post_training_demo_with_a_few_steps(short_run):
    out, proc = short_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for index, name in enumerate(["tokenizer", "corpus", "train", "data", "before", "sft", "dpo", "chat"]):
        assert f"=== [{index + 1}/8] {name}:" in text
        assert f"--- {name}: " in text
    found = {when: (float(acc), int(right), int(total)) for when, acc, right, total in ACCURACY.findall(text)}
    assert set(found) == {"base", "after SFT", "after DPO"}
    for accuracy, right, total in found.values():
        assert total >= 20 and accuracy == pytest.approx(right / total, abs=0.005)
    assert "user:      What does `decimal." in text and "assistant: " in text
    assert "demo-post: done in" in text
    for path in ("base/run/checkpoints", "sft/checkpoints", "dpo/checkpoints", "post-data/held_out.jsonl"):
        assert (out / path).exists(), path


@pytest.mark.slow
def test_post_training_demo_below_the_bar_fails_at_stage_dpo(short_run, tmp_path):
    """Reusing the first run's base model (one 'base' stage), with an accuracy bar out of reach."""
    out, _ = short_run
    proc = _demo_post(tmp_path / "again", "--base", str(out / "base"), min_accuracy=1.01)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "=== [1/6] base: the base demo's checkpoint, reused" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"demo-post: FAILED: stage 5/6 'dpo' failed: held-out preference accuracy after DPO is", last), last
