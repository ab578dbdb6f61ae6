"""Dual Chunk Attention: perplexity past the trained context, and the memory of a long prefill.

    python bench/dca_perplexity.py                 # both parts
    python bench/dca_perplexity.py --skip-memory   # perplexity only (about a minute on 2 CPU cores)

Perplexity: a tiny Qwen2 is trained (a small optax loop) at a short context on synthetic documents
whose structure reaches back across the document: each is its own random pattern of 16 of the 64
tokens, repeated, with 10% of the tokens replaced at random, so a token is predicted by the ones 16,
32, 48, ... back (a model that has learnt that: perplexity ~2.1 once a document's first period is
past, 64 before). (Documents with their own token sets and successor tables, which need induction
heads, left the loss on a plateau for 600 steps of this model.) Then on
held-out documents 4x the trained context: DCA (chunk_size = the trained context, local_size an
eighth of it) against plain RoPE extrapolation, and against the short-context perplexity (the same
documents cut into windows of the trained context).

Memory: separate subprocesses prefill 8k and 32k tokens through `qwen2_jax.generate` with DCA (the
KV-cache path) on a tiny model and report their peak RSS (VmHWM), and the XLA temp buffers of the
uncached forward program at both lengths; the attention never holds a [t, t] matrix, so both grow
about linearly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.hf_config import DualChunkSettings
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask

VOCAB = 64
PERIOD = 16
NOISE = 0.1


def documents(rng: np.random.RandomState, count: int, length: int) -> np.ndarray:
    """[count, length] token ids: each row one document, its own random pattern of PERIOD tokens
    repeated, each token replaced by a random one with probability NOISE."""
    pattern = rng.randint(0, VOCAB, (count, PERIOD))
    out = np.tile(pattern, (1, -(-length // PERIOD)))[:, :length]
    noise = rng.rand(count, length) < NOISE
    return np.where(noise, rng.randint(0, VOCAB, (count, length)), out).astype(np.int32)


def tiny_config(context: int, layers: int = 3) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def unboxed(params):
    """Init's params without their logical-axis boxes."""
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value"))


def token_nll(config: Qwen2Config, params, ids_bt) -> np.ndarray:
    """Per-token negative log-likelihood [b, t-1] of each next token (float32 forward)."""
    ones = jnp.ones_like(ids_bt)
    logits = Qwen2ForCausalLM(config).apply({"params": params}, ids_bt, positions_from_mask(ones), ones)["logits"]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1)[..., 0])


def train(config: Qwen2Config, context: int, steps: int, batch: int, seed: int):
    import optax

    model = Qwen2ForCausalLM(config)
    ones = jnp.ones((1, context), jnp.int32)
    params = unboxed(model.init(jax.random.key(seed), ones, positions_from_mask(ones), ones)["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, steps, 3e-4)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    state = optimizer.init(params)

    def loss_fn(p, ids_bt):
        mask = jnp.ones_like(ids_bt)
        logits = model.apply({"params": p}, ids_bt, positions_from_mask(mask), mask)["logits"]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1))

    @jax.jit
    def step(p, s, ids_bt):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids_bt)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.RandomState(seed)
    for i in range(steps):
        params, state, loss = step(params, state, jnp.asarray(documents(rng, batch, context)))
        if (i + 1) % max(1, steps // 5) == 0:
            print(f"  step {i + 1}/{steps}: loss {float(loss):.3f}", flush=True)
    return params


def perplexity(args) -> dict:
    context, long = args.context, 4 * args.context
    config = tiny_config(context)
    began = time.perf_counter()
    print(f"training a tiny Qwen2 ({config.num_hidden_layers} layers, width 64) at context {context}:", flush=True)
    params = train(config, context, args.steps, args.batch, args.seed)
    print(f"  trained in {time.perf_counter() - began:.0f} s", flush=True)
    held_out = jnp.asarray(documents(np.random.RandomState(args.seed + 1), args.eval_docs, long))
    windows = held_out.reshape(args.eval_docs * 4, context)  # the same documents, cut to the trained context
    dca = DualChunkSettings(chunk_size=context, local_size=context // 8)
    nll = {
        "short": token_nll(config, params, windows),
        "rope": token_nll(config, params, held_out),
        "dca": token_nll(config.replace(dual_chunk_attention=dca), params, held_out),
    }
    ppl = {name: math.exp(float(v.mean())) for name, v in nll.items()}
    # the last quarter of each long document: tokens whose context is past anything trained
    tail = {name: math.exp(float(nll[name][:, 3 * context :].mean())) for name in ("rope", "dca")}
    print(f"perplexity on {args.eval_docs} held-out documents:")
    print(f"  short context ({context} tokens, {args.eval_docs * 4} windows):  {ppl['short']:.3f}")
    print(
        f"  {long} tokens, plain RoPE extrapolation:  {ppl['rope']:.3f}  ({ppl['rope'] / ppl['short']:.2f}x short; "
        f"last quarter {tail['rope']:.3f})"
    )
    print(
        f"  {long} tokens, DCA chunk {dca.chunk_size} local {dca.local_size}:  {ppl['dca']:.3f}  "
        f"({ppl['dca'] / ppl['short']:.2f}x short; last quarter {tail['dca']:.3f})"
    )
    return {"ppl": ppl, "tail": tail}


# ------------------------------------------------------------------------------------------ memory
def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec (Linux keeps
    ru_maxrss across exec, so a probe started by a large parent would report the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_probe(length: int) -> None:
    """One prefill of `length` tokens (run in its own process): prints a JSON line."""
    from qwen2_jax.forward import _forward
    from qwen2_jax.generate import generate
    from qwen2_jax.options import RunOptions

    config = tiny_config(2048, layers=2).replace(dual_chunk_attention=DualChunkSettings(2048, 256))
    ones = jnp.ones((1, 16), jnp.int32)
    params = Qwen2ForCausalLM(config).init(jax.random.key(0), ones, positions_from_mask(ones), ones)["params"]
    params = unboxed(params)
    ids = np.random.RandomState(0).randint(0, VOCAB, (1, length))
    began = time.perf_counter()
    tokens = generate(config, params, [ids[0].tolist()], 1)
    seconds = time.perf_counter() - began
    rss = peak_rss()
    compiled = _forward.lower(
        params,
        jnp.asarray(ids),
        jnp.ones_like(jnp.asarray(ids)),
        config=config,
        options=RunOptions().for_params(params, None),
        output_hidden_states=False,
        output_router_logits=False,
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps({"length": length, "peak_rss": rss, "forward_temp": temp, "seconds": seconds, "tokens": tokens}))


def memory(args) -> dict:
    runs = {}
    for length in (8192, 32768):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(length)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            raise SystemExit(f"memory probe at {length} failed:\n{proc.stderr[-3000:]}")
        runs[length] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[length]
        print(
            f"  prefill {length:>6} tokens (DCA 2048/256, 2 layers, width 64): "
            f"peak RSS {r['peak_rss'] / 2**20:7.1f} MiB, "
            f"forward temp buffers {r['forward_temp'] / 2**20:7.1f} MiB, generate {r['seconds']:.1f} s",
            flush=True,
        )
    small, large = runs[8192], runs[32768]
    rss_ratio = large["peak_rss"] / small["peak_rss"]
    temp_ratio = large["forward_temp"] / small["forward_temp"]
    print(f"  32k / 8k: peak RSS {rss_ratio:.2f}x, forward temp buffers {temp_ratio:.2f}x (goal <= 4.5x)")
    return {"rss_ratio": rss_ratio, "temp_ratio": temp_ratio, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=128, help="trained context (eval at 4x)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-docs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-perplexity", action="store_true")
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe is not None:
        _memory_probe(args.memory_probe)
        return
    if not args.skip_perplexity:
        perplexity(args)
    if not args.skip_memory:
        print("peak memory of a long prefill with DCA (separate processes):", flush=True)
        memory(args)


if __name__ == "__main__":
    main()
