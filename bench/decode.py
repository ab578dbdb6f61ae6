"""Decode speed: our jitted generate against HF transformers (PyTorch) on the same machine, in one run.

    .venv/bin/python bench/decode.py                                  # Qwen2-0.5B shapes, fp32, CPU
    .venv/bin/python bench/decode.py --preset qwen2-1.5b --dtype bfloat16 --no-hf   # on a GPU

Random weights of the preset's shapes; 32-token prompts, 32 new tokens, greedy, no early stop, batch
1 and 8. Compilation and warm-up are excluded (each path runs once untimed first). Every repeat times
ours and HF back to back (the machine may be shared: the ratio of interleaved runs is the number to
trust); the best of the repeats is reported. HF runs `model.generate` with torch threads = --threads.

Reported per batch size: end-to-end tokens/s (prefill + 32 steps, as HF generate measures), the
decode-only time per step ((t(32 new) - t(1 new)) / 31), and at batch 1 the fraction of the memory
roofline: (weight bytes read per step / measured read bandwidth) / measured step time. The read
bandwidth is the best of a jitted matvec over a 512 MiB matrix and a sum over a 1 GiB array.
`--layer-layouts per_layer,stacked` also times the nn.scan layer loop (the checkpoint layout as is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2-0.5b")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads for HF")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer-layouts", default="per_layer", help="comma list of per_layer,stacked")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth(dtype) -> float:
    import jax
    import jax.numpy as jnp

    results = []
    w = jnp.asarray(np.random.RandomState(0).randn(32768, 4096).astype(np.float32)).astype(dtype)  # 512 MiB fp32
    x = jnp.ones((4096,), dtype)
    matvec = jax.jit(lambda w, x: w @ x)
    matvec(w, x).block_until_ready()
    results.append(w.nbytes / best_time(lambda w=w: matvec(w, x).block_until_ready(), 10))
    del w
    big = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    results.append(big.nbytes / best_time(lambda: total(big).block_until_ready(), 5))
    return max(results)


def weight_bytes_per_step(config, params_bytes, embed_bytes, batch) -> float:
    """Bytes of weights one decode step reads: everything, except that an untied embedding is only
    gathered (batch rows), not read whole."""
    if config.tie_word_embeddings:
        return params_bytes
    return params_bytes - embed_bytes + batch * embed_bytes / config.vocab_size


def hf_model(config, dtype, threads):
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(threads)
    hf_cfg = HFConfig(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "dtype")})
    torch.manual_seed(0)
    with torch.no_grad():
        model = Qwen2ForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()
    return model


def main(argv=None):
    args = parse(argv)
    import jax
    import jax.numpy as jnp

    from qwen2_jax.config import preset
    from qwen2_jax.generate import GenerateOptions, Generator
    from qwen2_jax.params import init_params

    config = preset(args.preset)
    dtype = jnp.dtype(args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.layer_layouts.split(",")
    device = jax.devices()[0]
    print(
        f"device: {device.platform} {device.device_kind}, {os.cpu_count()} CPUs; model {args.preset} {args.dtype}; "
        f"prompt {args.prompt_len}, new {args.new_tokens}, greedy; HF torch threads {args.threads}",
        flush=True,
    )

    bw = read_bandwidth(dtype)
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s", flush=True)

    rng = np.random.RandomState(0)
    prompts = {b: [rng.randint(0, 150000, args.prompt_len).tolist() for _ in range(b)] for b in batches}
    params = init_params(config, jax.random.key(0), param_dtype=dtype)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    embed_bytes = params["embed_tokens"].nbytes
    hf = None if args.no_hf else hf_model(config, args.dtype, args.threads)

    def ours(generator, b, n):
        return lambda: generator.generate(prompts[b], GenerateOptions(n, eos_token_ids=[]))

    def theirs(b, n):
        import torch

        ids = torch.tensor(prompts[b])

        def run():
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == args.prompt_len + n

        return run

    results = {
        "device": f"{device.platform} {device.device_kind}",
        "preset": args.preset,
        "dtype": args.dtype,
        "read_bandwidth_gbs": bw / 1e9,
        "rows": [],
    }
    n = args.new_tokens
    # the stacked generator runs the checkpoint params as they are; per_layer then moves them
    for mode in ["stacked"] + [m for m in modes if m != "stacked"] if "stacked" in modes else modes:
        generator = Generator(config, params, layer_layout=mode, consume=mode == "per_layer")
        for b in batches:
            full, one = ours(generator, b, n), ours(generator, b, 1)
            full(), one()  # compile + warm up
            if hf is not None:
                theirs(b, n)(), theirs(b, 1)()
            t_ours, t_ours1, t_hf, t_hf1 = [], [], [], []
            for _ in range(args.repeats):  # interleaved
                t_ours.append(best_time(full, 1))
                t_ours1.append(best_time(one, 1))
                if hf is not None:
                    t_hf.append(best_time(theirs(b, n), 1))
                    t_hf1.append(best_time(theirs(b, 1), 1))
            row = {
                "layer_layout": mode,
                "batch": b,
                "ours_s": min(t_ours),
                "ours_tok_s": b * n / min(t_ours),
                "ours_step_ms": 1e3 * (min(t_ours) - min(t_ours1)) / (n - 1),
            }
            step_s = row["ours_step_ms"] / 1e3
            row["ours_roofline_fraction"] = weight_bytes_per_step(config, params_bytes, embed_bytes, b) / bw / step_s
            if hf is not None:
                row.update(
                    hf_s=min(t_hf),
                    hf_tok_s=b * n / min(t_hf),
                    hf_step_ms=1e3 * (min(t_hf) - min(t_hf1)) / (n - 1),
                    speedup=min(t_hf) / min(t_ours),
                    speedup_per_repeat=[h / o for h, o in zip(t_hf, t_ours)],
                )
            results["rows"].append(row)
            line = (
                f"[{mode:9s}] batch {b}: ours {row['ours_tok_s']:7.2f} tok/s (decode {row['ours_step_ms']:.1f} "
                f"ms/step, {100 * row['ours_roofline_fraction']:.0f}% of roofline)"
            )
            if hf is not None:
                line += (
                    f" | HF {row['hf_tok_s']:7.2f} tok/s (decode {row['hf_step_ms']:.1f} ms/step) | "
                    f"speedup {row['speedup']:.2f}x (per repeat: "
                    + ", ".join(f"{s:.2f}" for s in row["speedup_per_repeat"])
                    + ")"
                )
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
