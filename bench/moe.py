"""One Qwen2-MoE sparse layer at Qwen2-57B-A14B proportions: tokens/s of our dropless paths against a
dense one-hot einsum over all experts and against HF PyTorch (`Qwen2MoeSparseMoeBlock`), in one run.

    .venv/bin/python bench/moe.py                       # CPU: width scaled by 1/8, float32
    .venv/bin/python bench/moe.py --width-div 1 --dtype bfloat16 --no-torch   # full 57B-A14B shapes (GPU)

57B-A14B: hidden 3584, 64 experts of width 2560, top-8, one shared expert of width 20480. The CPU
default divides hidden and both widths by --width-div (8: 448 / 320 / 2560); experts and top-k are kept.
Every path computes the whole block (router, routed experts, sigmoid-gated shared expert).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="256,4096")
    p.add_argument("--width-div", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--paths", default="tiled,ragged_dot,onehot")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def make_config(div):
    from qwen2_jax.config import preset

    full = preset("qwen2-57b-a14b")
    return full.replace(
        hidden_size=full.hidden_size // div,
        num_attention_heads=4,
        num_key_value_heads=1,
        moe_intermediate_size=full.moe_intermediate_size // div,
        shared_expert_intermediate_size=full.shared_expert_intermediate_size // div,
        intermediate_size=full.intermediate_size // div,
        num_hidden_layers=1,
        layer_types=None,
        vocab_size=1024,
    )


def onehot_block(params, x_btd, cfg, dtype):
    """The baseline: every expert on every token, weighted by the (one-hot spread) routing weights."""
    from qwen2_jax.moe import route

    p = params
    b, t, d = x_btd.shape
    x = x_btd.reshape(b * t, d).astype(dtype)
    logits = x @ p["router_kernel"].astype(dtype)
    w, idx = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    dense_w = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts, dtype=dtype) * w[..., None], axis=1)  # [n, E]
    e = p["experts"]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, e["gate_kernel"].astype(dtype))) * jnp.einsum(
        "nd,edf->nef", x, e["up_kernel"].astype(dtype)
    )
    y = jnp.einsum("nef,efd,ne->nd", h, e["down_kernel"].astype(dtype), dense_w)
    s = p["shared_expert"]
    shared = (jax.nn.silu(x @ s["gate_kernel"].astype(dtype)) * (x @ s["up_kernel"].astype(dtype))) @ s[
        "down_kernel"
    ].astype(dtype)
    gate = jax.nn.sigmoid(x @ p["shared_expert_gate_kernel"].astype(dtype))
    return (y + gate * shared).reshape(b, t, d)


def timeit(fn, iters):
    out = fn()
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


def torch_block(cfg, params):
    import torch
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = Qwen2MoeConfig(
        hidden_size=cfg.hidden_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
    )
    block = Qwen2MoeSparseMoeBlock(hf_cfg).eval()

    def t(a):
        return torch.from_numpy(np.asarray(a, np.float32).copy())

    e = params["experts"]
    with torch.no_grad():
        block.gate.weight.copy_(t(params["router_kernel"]).T)
        gate_up = torch.cat([t(e["gate_kernel"]).transpose(1, 2), t(e["up_kernel"]).transpose(1, 2)], dim=1)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(t(e["down_kernel"]).transpose(1, 2))
        for name in ("gate", "up", "down"):
            getattr(block.shared_expert, f"{name}_proj").weight.copy_(t(params["shared_expert"][f"{name}_kernel"]).T)
        block.shared_expert_gate.weight.copy_(t(params["shared_expert_gate_kernel"]).T)
    return block


def main():
    args = parse()
    import flax.linen as nn

    from qwen2_jax.moe import SparseMoeBlock
    from qwen2_jax.options import RunOptions

    cfg = make_config(args.width_div)
    dtype = jnp.dtype(args.dtype)
    x0 = jnp.zeros((1, 8, cfg.hidden_size), dtype)
    params = nn.unbox(
        SparseMoeBlock(cfg, RunOptions(dtype=dtype, param_dtype=dtype)).init(jax.random.key(0), x0)["params"]
    )
    # a router that spreads tokens over experts (HF init std 0.02 would too; keep it explicit)
    params["router_kernel"] = (jax.random.normal(jax.random.key(1), params["router_kernel"].shape) * 0.5).astype(dtype)
    paths = args.paths.split(",")
    print(
        f"backend={jax.default_backend()} devices={len(jax.devices())} dtype={args.dtype} "
        f"hidden={cfg.hidden_size} experts={cfg.num_experts} top_k={cfg.num_experts_per_tok} "
        f"expert_width={cfg.moe_intermediate_size} shared_width={cfg.shared_expert_intermediate_size} "
        f"(57B-A14B widths / {args.width_div})"
    )
    results = []
    block_torch = None if args.no_torch else torch_block(cfg, params)
    for n in [int(v) for v in args.tokens.split(",")]:
        x = jax.random.normal(jax.random.key(2), (1, n, cfg.hidden_size)).astype(dtype)
        row = {"tokens": n}
        outs = {}
        for path in paths:
            if path == "onehot":
                fn = jax.jit(lambda p, x: onehot_block(p, x, cfg, dtype))
            else:
                block = SparseMoeBlock(cfg, RunOptions(dtype=dtype, param_dtype=dtype, moe_impl=path))
                fn = jax.jit(lambda p, x, block=block: block.apply({"params": p}, x)[0])
            iters = 1 if (path == "ragged_dot" and jax.default_backend() == "cpu" and n > 1024) else args.iters
            sec, out = timeit(lambda fn=fn, x=x: fn(params, x), iters)
            row[path] = n / sec
            outs[path] = np.asarray(out, np.float32)
        if block_torch is not None:
            import torch

            torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            xt = torch.from_numpy(np.asarray(x, np.float32)).to(torch_dtype)
            bt = block_torch.to(xt.dtype)
            with torch.no_grad():
                bt(xt)
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    ref = bt(xt)
                    times.append(time.perf_counter() - t0)
            row["hf_torch"] = n / min(times)
            outs["hf_torch"] = ref.float().numpy()
        base = outs.get("hf_torch", outs[paths[0]])
        row["max_rel_diff_vs_first"] = {k: float(np.abs(v - base).max() / np.abs(base).max()) for k, v in outs.items()}
        results.append(row)
        line = "  ".join(f"{k}={v:,.0f} tok/s" for k, v in row.items() if k in paths + ["hf_torch"])
        print(f"tokens={n:5d}  {line}")
        for p in paths:
            if p != "onehot" and "onehot" in row:
                print(f"    {p} / onehot = {row[p] / row['onehot']:.2f}x", end="")
            if p != "onehot" and "hf_torch" in row:
                print(f"    {p} / hf_torch = {row[p] / row['hf_torch']:.2f}x", end="")
        print(
            f"\n    max |diff| / max |ref| vs {'hf_torch' if 'hf_torch' in outs else paths[0]}: "
            + ", ".join(f"{k}={v:.1e}" for k, v in row["max_rel_diff_vs_first"].items())
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
