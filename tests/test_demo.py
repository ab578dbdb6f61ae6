"""`make demo` (qwen2_jax.demo) and CI's reading of README's first code block.

Fast: the README block CI runs, the shipped recipe, the held-out prompt, stage failures named, --keep
refusing a non-empty directory. Slow: the whole demo with a few training steps (every stage, the
transformers comparison included, since the test environment has transformers), and a demo whose
training does not reach the learned threshold failing at stage 'train' with exit status 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwen2_jax.demo import pipeline
from qwen2_jax.demo.prompt import held_out_prompt
from qwen2_jax.demo.stages import StageFailed, Stages, run_command
from train.config import load_config
from train.data import prepare
from xla_env import run_xla_flags

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands_module():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- README / CI
def test_readme_first_block_holds_the_two_commands_ci_runs():
    rc = _readme_commands_module()
    assert rc.readme_commands((ROOT / "README.md").read_text(encoding="utf-8")) == ["make demo", "make test"]
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py"), str(ROOT / "README.md")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split("\n")[:2] == ["make demo", "make test"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("# title\n\nno code here\n", "no fenced code block"),
        ("```\nmake demo\n```\n", "has 1 lines"),
        ("```\nmake demo  # a\nmake test  # b\nmake lint\n```\n", "has 3 lines"),
        ("```\nmake demo  # a\npytest -q  # b\n```\n", "is not 'make TARGET"),
    ],
)
def test_readme_block_of_another_shape_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        _readme_commands_module().readme_commands(text)


def test_ci_script_fails_loudly_on_a_changed_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```\nmake demo\n```\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py"), str(readme)], capture_output=True, text=True
    )
    assert out.returncode == 1 and out.stdout == ""
    assert "has 1 lines" in out.stderr


# --------------------------------------------------------------------------------------- the recipe
def test_demo_recipe_is_shipped_in_the_package_and_linked_from_configs():
    path = Path(pipeline.train_config_path())
    assert path.is_file()
    assert (ROOT / "configs" / "train" / "demo.yaml").resolve() == path.resolve()
    config = load_config(str(path), ["output_dir=/tmp/unused"])
    assert config.seq_len == pipeline.SEQ_LEN
    assert config.eval_every and config.total_steps % config.eval_every == 0  # the last step is evaluated
    assert yaml.safe_load(path.read_text())["data"]["sources"] == []  # alone, it trains on the built-in corpus


# --------------------------------------------------------------------------------------- prepared data
def test_training_reads_a_directory_prepared_by_qwen2_train_prepare(prepared, tmp_path):
    """What the demo's train stage relies on: `data.sources=[DIR]` with DIR from `qwen2-train prepare`."""
    from train.batches import Corpus, CorpusError
    from train.config import DataConfig

    cache = tmp_path / "cache"
    corpus = Corpus(DataConfig(sources=(str(prepared),), cache_dir=str(cache)), 16, progress=False)
    assert corpus.data_dir == str(prepared)
    assert not cache.exists()  # read in place: nothing prepared again
    batch = next(corpus.train_iterator(global_batch_size=2, seed=0, process_index=0, process_count=1))
    assert batch["input_ids"].shape == (2, 16)
    with pytest.raises(CorpusError, match=r"was prepared with --seq-len 16, but the run's seq_len is 32"):
        Corpus(DataConfig(sources=(str(prepared),), cache_dir=str(cache)), 32, progress=False)


# --------------------------------------------------------------------------------------- the prompt
def test_held_out_prompt_is_a_docstring_start_from_a_held_out_row(tmp_path, tok_dir, tok):
    sections = [
        f"pkg.mod{i}.func{i}\n\nReturn the value number {i} of the table, or raise an error when it is missing "
        f"from the table and no default was given by the caller."
        for i in range(40)
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "\n\n\n".join(sections)}) + "\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare([source], data, seq_len=64, eval_sequences=3, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    prompt = held_out_prompt(str(data), tok, words=4, reference_chars=60)
    assert prompt.text.startswith("pkg.mod") and prompt.text.endswith("\n\nReturn the value number")
    eval_rows = [tok.decode(list(map(int, row))) for row in _eval_rows(data)]
    joined = prompt.text + prompt.reference
    assert joined in eval_rows[prompt.row]
    assert len(prompt.reference) == 60
    assert held_out_prompt(str(data), tok, words=4, reference_chars=60) == prompt  # deterministic


def _eval_rows(data: Path):
    import numpy as np

    meta = json.loads((data / "meta.json").read_text())
    return [row for shard in meta["splits"]["eval"]["shards"] for row in np.load(data / shard["file"])]


# --------------------------------------------------------------------------------------- failures
def test_a_failing_stage_is_named_with_its_number():
    stages = Stages(3)
    with stages.stage("first", "works"):
        pass
    with pytest.raises(StageFailed, match=r"stage 2/3 'second' failed: boom"):
        with stages.stage("second", "fails"):
            raise StageFailed("boom")
    with pytest.raises(StageFailed, match=r"stage 2/3 'third' failed: KeyError"):
        with stages.stage("third", "a bug in the demo itself"):
            raise KeyError("x")
    assert [name for name, _ in stages.times] == ["first"]


def test_a_command_exiting_non_zero_fails_the_stage(tmp_path, capfd):
    stages = Stages(1)
    with pytest.raises(StageFailed, match=r"stage 1/1 'train' failed: qwen2-train exited with status 2"):
        with stages.stage("train", "a recipe that does not exist"):
            run_command(stages, "qwen2-train", ["--config", str(tmp_path / "missing.yaml")])
    out, err = capfd.readouterr()
    assert f"$ qwen2-train --config {tmp_path / 'missing.yaml'}" in out
    assert "qwen2-train: error: config file not found" in err


def test_keep_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert pipeline.main(["--keep", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- the whole demo
def _demo_env():
    # one CPU device, as a user has (conftest sets 8 fake ones for this process), compiled as every test
    # process compiles (tests/xla_env.py: cheaper code generation, the compilation cache's flag)
    return dict(os.environ, XLA_FLAGS=run_xla_flags(1))


@pytest.mark.slow
def test_whole_demo_with_a_few_steps(tmp_path, monkeypatch, capfd):
    """Every stage through its real command, on few steps (the learned threshold lowered accordingly):
    the outputs exist, the transformers comparison ran and agreed, and the last stage generated text."""
    monkeypatch.setenv("XLA_FLAGS", _demo_env()["XLA_FLAGS"])
    monkeypatch.setattr(pipeline, "LEARNED_MARGIN", -10.0)  # 6 steps learn little
    keep = tmp_path / "demo"
    assert pipeline.main(["--keep", str(keep), "--steps", "6"]) == 0
    out, err = capfd.readouterr()
    for index, name in enumerate(["tokenizer", "corpus", "train", "export", "transformers", "convert", "generate"]):
        assert f"=== [{index + 1}/7] {name}:" in out
        assert f"--- {name}: " in out
    assert "equal: the same" in out
    assert "greedy (--temperature 0):" in out and "sampled (" in out
    for path in (
        "tokenizer/tokenizer.json",
        "data/meta.json",
        "run/metrics.jsonl",
        "hf/model.safetensors",
        "hf/tokenizer.json",
        "orbax/params",
        "run/checkpoints/tokenizer.json",
    ):
        assert (keep / path).exists(), path
    assert "demo: done in" in out


@pytest.mark.slow
def test_demo_that_has_not_learned_fails_at_stage_train(tmp_path):
    env = dict(_demo_env(), TMPDIR=str(tmp_path))  # where the demo's temporary directory goes
    proc = subprocess.run(
        [sys.executable, "-m", "qwen2_jax.demo", "--steps", "2"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("demo: FAILED: stage 3/7 'train' failed: the held-out loss"), last
    assert "--- corpus:" in proc.stdout and "--- train:" not in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith("qwen2-jax-demo-")]
