"""qwen2-generate: CLI == API, generation_config defaults, text prompts and chat, exit codes."""

import io
import json
import os
import subprocess
import sys

import pytest

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny HF-written checkpoint with the real vocabulary size, the Qwen2 tokenizer and an
    Instruct-style generation_config.json."""
    from qwen2_jax.tokenizer_build import write_qwen2_tokenizer

    model = make_hf_model(
        hf_dense_config(
            vocab_size=151936, hidden_size=32, intermediate_size=48, num_hidden_layers=2, eos_token_id=151645
        ),
        seed=1,
    )
    path = tmp_path_factory.mktemp("cli")
    model.save_pretrained(path)
    write_qwen2_tokenizer(path)
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "eos_token_id": [151645, 151643],
                "repetition_penalty": 1.05,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
            }
        )
    )
    config, params = qwen2_jax.load_checkpoint(path)
    return str(path), config, params


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_equals_api_greedy_and_sampled(ckpt, capsys):
    path, config, params = ckpt
    rc, out, _ = _run(
        capsys, "--checkpoint", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--temperature", "0", "--json"
    )
    assert rc == 0
    result = json.loads(out)
    expect = qwen2_jax.generate(
        config, params, [[1, 2, 3]], 6, eos_token_ids=[151645, 151643], repetition_penalty=1.05
    )[0]
    assert result["tokens"] == expect and isinstance(result["text"], str)
    # No flags: generation_config.json's sampling defaults, seed 0.
    rc, out, _ = _run(
        capsys, "--checkpoint", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", "--seed", "4"
    )
    expect = qwen2_jax.generate(
        config,
        params,
        [[1, 2, 3]],
        6,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        seed=4,
        eos_token_ids=[151645, 151643],
        repetition_penalty=1.05,
    )[0]
    assert rc == 0 and json.loads(out)["tokens"] == expect


def test_text_prompt_and_chat_template(ckpt, capsys):
    from qwen2_jax.tokenizer import load_tokenizer

    path, config, params = ckpt
    tok = load_tokenizer(path)
    rc, out, _ = _run(
        capsys,
        "--checkpoint",
        path,
        "--prompt",
        "Hello world",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1.0",
        "--json",
    )
    result = json.loads(out)
    expect = qwen2_jax.generate(config, params, [tok.encode("Hello world")], 5, eos_token_ids=[151645, 151643])[0]
    assert rc == 0 and result["tokens"] == expect and result["prompt_tokens"] == 2
    templated = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
    rc, out, _ = _run(
        capsys, "--checkpoint", path, "--prompt", "Hi", "--chat-template", "--json", "--max-new-tokens", "3"
    )
    assert rc == 0 and json.loads(out)["prompt_tokens"] == len(templated)


def test_streamed_prompt_prints_text(ckpt, capsys):
    path, _, _ = ckpt
    rc, out, err = _run(capsys, "--checkpoint", path, "--prompt", "Hello", "--max-new-tokens", "4")
    assert rc == 0 and out.endswith("\n") and "tokens" in err


def test_chat_keeps_history(ckpt, capsys, monkeypatch):
    from qwen2_jax.tokenizer import load_tokenizer

    gen = sys.modules["qwen2_jax.generate"]  # the package attribute `generate` is the function

    path, _, _ = ckpt
    seen = []
    real = gen.Generator.stream

    def spy(self, prompts, *a, **kw):
        seen.append(prompts[0])
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(gen.Generator, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n\nSecond question\n"))
    rc, out, _ = _run(capsys, "--checkpoint", path, "--chat", "--max-new-tokens", "3", "--quiet")
    assert rc == 0 and len(seen) == 2 and out.count("\n") == 2
    tok = load_tokenizer(path)
    second = tok.decode(seen[1])
    assert second.startswith(tok.decode(seen[0])) and "Second question" in second
    assert second.endswith("<|im_start|>assistant\n") and second.count("<|im_start|>assistant") == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt-ids", "1,2"], "checkpoint not found"),
        (["--prompt-ids", ""], "empty"),
        (["--prompt", ""], "empty"),
        (["--prompt-ids", ",".join(["5"] * 300)], "context"),
        (["--prompt-ids", "1,x"], "--prompt-ids"),
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "1,2", "--top-p", "0"], "top_p"),
        (["--prompt-ids", "1,2", "--top-k", "-2"], "top_k"),
        (["--prompt-ids", "999999999"], "vocabulary"),
        ([], "one of the arguments"),
        (["--prompt-ids", "1", "--chat"], "not allowed"),
    ],
)
def test_bad_input_exits_2_with_one_line(ckpt, capsys, argv, match):
    path = "/nonexistent/ckpt" if match == "checkpoint not found" else ckpt[0]
    rc, out, err = _run(capsys, "--checkpoint", path, *argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err


def test_text_prompt_without_tokenizer_exits_2(tmp_path, capsys):
    make_hf_model(hf_dense_config(), seed=0).save_pretrained(tmp_path)
    capsys.readouterr()  # HF's progress bar
    rc, _, err = _run(capsys, "--checkpoint", str(tmp_path), "--prompt", "hello")
    assert rc == 2 and "tokenizer.json" in err and err.count("\n") == 1


def test_module_entry_point(ckpt):
    path, config, params = ckpt
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen2_jax",
            "--checkpoint",
            path,
            "--prompt-ids",
            "7,8,9",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expect = qwen2_jax.generate(
        config, params, [[7, 8, 9]], 4, eos_token_ids=[151645, 151643], repetition_penalty=1.05
    )[0]
    assert json.loads(proc.stdout)["tokens"] == expect
    proc = subprocess.run(
        [sys.executable, "-m", "qwen2_jax", "--checkpoint", path + "-missing", "--prompt-ids", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
