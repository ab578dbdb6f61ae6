"""Decode speed: our jitted generate against HF transformers (PyTorch) on the same machine, in one run.

    .venv/bin/python bench/decode.py                                  # Qwen2-0.5B shapes, fp32, CPU
    .venv/bin/python bench/decode.py --dtype bfloat16                 # both sides in bfloat16
    .venv/bin/python bench/decode.py --dtype bfloat16 --quantize int8 # + ours with int8 kernels
    .venv/bin/python bench/decode.py --preset qwen2-1.5b --dtype bfloat16 --no-hf   # on a GPU

Random weights of the preset's shapes; 32-token prompts, 32 new tokens, greedy, no early stop, batch
1 and 8. Compilation and warm-up are excluded (each path runs once untimed first). Every repeat times
ours and HF back to back (the machine may be shared: the ratio of interleaved runs is the number to
trust); the best of the repeats is reported. HF runs `model.generate` with torch threads = --threads.

Reported per batch size: end-to-end tokens/s (prefill + 32 steps, as HF generate measures), the
decode-only time per step ((t(32 new) - t(1 new)) / 31), and at batch 1 the fraction of the memory
roofline: (weight bytes read per step / measured read bandwidth) / measured step time. The read
bandwidth is the best of a jitted float32 matvec over a 512 MiB matrix and a sum over a 1 GiB array;
on CPU also `qwen2_jax.cpu_kernels.gemv` over the same matrix (decode's matvec, which reads faster than
XLA's); the roofline counts the bytes of the weights as our generator holds them (bfloat16: 2 bytes a
weight; int8: 1, plus the scales). `--quantize int8` adds a generator with int8 kernels (HF and our
float generator stay in --dtype) and prints its speed over our float one, per repeat.
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
    p.add_argument("--quantize", default=None, choices=["int8"], help="also time ours with int8 kernels")
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


def read_bandwidth() -> float:
    import jax
    import jax.numpy as jnp

    results = []
    w = jnp.asarray(np.random.RandomState(0).randn(32768, 4096).astype(np.float32))  # 512 MiB
    x = jnp.ones((4096,), jnp.float32)
    matvec = jax.jit(lambda w, x: w @ x)
    matvec(w, x).block_until_ready()
    results.append(w.nbytes / best_time(lambda w=w: matvec(w, x).block_until_ready(), 10))
    from qwen2_jax import cpu_kernels

    if jax.default_backend() == "cpu" and cpu_kernels.available():  # decode's own matvec reads faster
        gemv = jax.jit(cpu_kernels.gemv)
        rows = x[None, :]
        gemv(rows, w).block_until_ready()
        results.append(w.nbytes / best_time(lambda w=w: gemv(rows, w).block_until_ready(), 10))
    del w
    big = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    results.append(big.nbytes / best_time(lambda: total(big).block_until_ready(), 5))
    return max(results)


def weight_bytes_per_step(config, params) -> float:
    """Bytes of weights one decode step reads: every leaf, except that an embedding which is not also
    the LM head (untied, or an int8 head beside it) is only gathered (a few rows), not read whole."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    if config.tie_word_embeddings and "lm_head_int8" not in params:
        return total
    return total - params["embed_tokens"].nbytes


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

    bw = read_bandwidth()
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s", flush=True)

    rng = np.random.RandomState(0)
    prompts = {b: [rng.randint(0, 150000, args.prompt_len).tolist() for _ in range(b)] for b in batches}
    params = init_params(config, jax.random.key(0), param_dtype=dtype)
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
        "quantize": args.quantize,
        "read_bandwidth_gbs": bw / 1e9,
        "rows": [],
    }
    n = args.new_tokens
    # the stacked generator runs the checkpoint params as they are; per_layer then moves them (the
    # int8 generator, made first, quantizes a copy)
    for mode in ["stacked"] + [m for m in modes if m != "stacked"] if "stacked" in modes else modes:
        generators = {}
        if args.quantize:
            generators[f"{mode} {args.quantize}"] = Generator(config, params, layer_layout=mode, quantize=args.quantize)
        generators[mode] = Generator(config, params, layer_layout=mode, consume=mode == "per_layer")
        generators = dict(reversed(generators.items()))  # float first
        for b in batches:
            runs = {label: (ours(g, b, n), ours(g, b, 1)) for label, g in generators.items()}
            if hf is not None:
                runs["HF"] = (theirs(b, n), theirs(b, 1))
            for full, one in runs.values():
                full(), one()  # compile + warm up
            times = {label: ([], []) for label in runs}
            for _ in range(args.repeats):  # interleaved
                for label, (full, one) in runs.items():
                    times[label][0].append(best_time(full, 1))
                    times[label][1].append(best_time(one, 1))
            float_label = mode
            for label, generator in generators.items():
                t_full, t_one = times[label]
                row = {
                    "layer_layout": mode,
                    "variant": label,
                    "batch": b,
                    "ours_s": min(t_full),
                    "ours_s_per_repeat": t_full,
                    "ours_tok_s": b * n / min(t_full),
                    "ours_step_ms": 1e3 * (min(t_full) - min(t_one)) / (n - 1),
                    "weight_bytes_per_step": weight_bytes_per_step(config, generator.params),
                }
                step_s = row["ours_step_ms"] / 1e3
                row["ours_roofline_fraction"] = row["weight_bytes_per_step"] / bw / step_s
                line = (
                    f"[{label:14s}] batch {b}: ours {row['ours_tok_s']:7.2f} tok/s (decode {row['ours_step_ms']:.1f} "
                    f"ms/step, {100 * row['ours_roofline_fraction']:.0f}% of roofline)"
                )
                if hf is not None:
                    t_hf, t_hf1 = times["HF"]
                    row.update(
                        hf_s=min(t_hf),
                        hf_tok_s=b * n / min(t_hf),
                        hf_step_ms=1e3 * (min(t_hf) - min(t_hf1)) / (n - 1),
                        speedup=min(t_hf) / min(t_full),
                        speedup_per_repeat=[h / o for h, o in zip(t_hf, t_full)],
                    )
                    line += (
                        f" | HF {row['hf_tok_s']:7.2f} tok/s (decode {row['hf_step_ms']:.1f} ms/step) | "
                        f"speedup {row['speedup']:.2f}x (per repeat: "
                        + ", ".join(f"{s:.2f}" for s in row["speedup_per_repeat"])
                        + ")"
                    )
                if label != float_label:
                    t_float = times[float_label][0]
                    row["over_float"] = min(t_float) / min(t_full)
                    row["over_float_per_repeat"] = [f / q for f, q in zip(t_float, t_full)]
                    line += (
                        f" | over ours {args.dtype} {row['over_float']:.2f}x (per repeat: "
                        + ", ".join(f"{s:.2f}" for s in row["over_float_per_repeat"])
                        + ")"
                    )
                results["rows"].append(row)
                print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
