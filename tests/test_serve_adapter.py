"""`qwen2-serve --adapter DIR` as a user runs it: a subprocess on a tiny random checkpoint with the real
Qwen2 tokenizer and a PEFT adapter directory, asked through the `openai` package. Its greedy text and
tokens are `qwen2-generate --adapter`'s (both merge the adapter into the weights at load), and not
the base model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import openai
import pytest

import qwen2_jax
from qwen2_jax import lora
from qwen2_jax.peft_adapter import save_peft_adapter
from qwen2_jax.tokenizer import load_tokenizer
from serve_utils import REPO, Server, write_checkpoint
from xla_env import xla_flags

PROMPT = "The capital of France is"
NEW_TOKENS = 12
ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this tree's serve and qwen2_jax


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """The tiny checkpoint (no generation_config.json: plain greedy on both sides) and random adapters
    on three targets (B != 0), saved as peft saves them."""
    root = tmp_path_factory.mktemp("serve_adapter")
    path = write_checkpoint(root / "tiny-qwen2", seed=5)
    os.remove(path / "generation_config.json")
    config, params = qwen2_jax.load_checkpoint(str(path))
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    adapters = lora.init_adapters(config, lora_config, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 16))
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
    save_peft_adapter(root / "adapter", config, lora_config, adapters)
    return path, str(root / "adapter"), config, params


@pytest.mark.slow
def test_served_greedy_text_equals_qwen2_generate_adapter(base_and_adapter):
    """Slow (a server and a qwen2-generate process): the default set covers the path in parts, the
    merge that --adapter runs at load (tests/test_lora.py: load_checkpoint(adapter=) == peft's
    merge_and_unload), the flag's check before the port opens (below), and the served text ==
    generate's on the same weights (tests/test_serve_http.py)."""
    path, adapter, config, params = base_and_adapter
    env = {**os.environ, **ENV, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "qwen2_jax", "--checkpoint", str(path), "--adapter", adapter, "--prompt", PROMPT]
    cmd += ["--max-new-tokens", str(NEW_TOKENS), "--temperature", "0", "--json"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    generated = json.loads(result.stdout)

    with Server(path, "--adapter", adapter, env=ENV) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(
            model="tiny-qwen2",
            prompt=PROMPT,
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True},
        ).model_dump()
        assert server.stop() == 0, server.stderr()
    choice = reply["choices"][0]
    assert choice["token_ids"] == generated["tokens"] and choice["text"] == generated["text"], (choice, generated)
    ids = load_tokenizer(path).encode(PROMPT)
    base = qwen2_jax.generate(config, params, [ids], NEW_TOKENS)[0]
    assert base != generated["tokens"]  # the adapter was applied


def test_a_bad_adapter_exits_2_before_the_port_opens(base_and_adapter, tmp_path, capsys):
    from serve import cli

    path = base_and_adapter[0]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["x"]}))
    rc = cli.main(["--checkpoint", str(path), "--adapter", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown target module 'x'" in err[0], err
