"""Accuracy of int8 kernels against bfloat16 on a Qwen2-0.5B-shaped model with trained-like weights.

    .venv/bin/python bench/quantize_accuracy.py [--positions 256] [--rows 2] [--seed 0] [--json FILE]
        [--plain tails,weight_outliers,norm_outliers] [--weight-outlier 8] [--final-norm 4]
    .venv/bin/python bench/quantize_accuracy.py --checkpoint DIR [--data PREPARED_DIR] [...]

With --checkpoint, the weights are a trained checkpoint's (any `load_checkpoint` directory: a
converted one, an HF directory, or a training run's `<output_dir>/checkpoints`), and the sequences
are the first --rows rows of the eval split of --data (a directory `qwen2-train prepare` wrote; its
seq_len sets the positions), or sampled from the bf16 model when --data is not given.

No trained checkpoint is available offline, so the weights are a real-scale init (HF's normal(0.02))
perturbed the way trained LLM weights differ from it, which is what breaks int8 quantization:
- heavy tails: every kernel drawn from Student's t (5 degrees of freedom) rescaled to std 0.02;
- outlier input channels: in every kernel, 1% of the input channels (rows of the [in, out] kernel)
  scaled by 8, so each output channel's absmax (its int8 step) is set by a few large weights;
- massive activations: the same 8 hidden channels get RMSNorm weights of 20 in every layer (the
  activations int8 sees have a few channels ~20x the rest);
- a peaked next-token distribution: the final norm weight is 4, so the logits spread like a trained
  model's (mean top-1 probability printed).
Sequences: --rows sequences of --positions tokens sampled from the bf16 model itself (temperature 1),
then teacher-forced through bf16, int8 (`load_checkpoint(..., quantize="int8")`'s kernels) and float32.

`--plain` leaves perturbations out (all three: HF's plain random init). A random network is a harsh
test: it has no structure that keeps quantization errors from compounding through 24 layers, and
its next-token distributions are flat (greedy picks are decided by small margins: compare the
bfloat16-vs-float32 agreement printed beside the int8 one).

Printed: KL(int8 || bf16) and KL(bf16 || int8) of the next-token distributions, averaged over every
position, greedy (argmax) agreement between int8 and bf16 over those positions, and for scale the
same between bfloat16 and float32. Also the same figures for "int8, every product through the CPU
decode kernel" and "int8, every product as two digits": a forward over many positions takes
`matmul.int8_dot`'s dequantized form (bf16 activations, exact int8 values), CPU decode steps the
kernel's int16 activation rows (`cpu_kernels.gemv`), decode on GPU/TPU the two-digit activation
split, so these lines measure what decode computes; and for "int8 weights, float activations": the
int8 kernels dequantized and multiplied in float32, which separates the error of the weights' int8
rounding from that of the activations'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OUTLIER_DIMS = 8
NORM_OUTLIER = 20.0
WEIGHT_OUTLIER = 8.0
WEIGHT_OUTLIER_FRACTION = 0.01
FINAL_NORM = 4.0
PERTURB = {"tails": True, "weight_outliers": True, "norm_outliers": True}
SETTINGS = {"weight_outlier": WEIGHT_OUTLIER, "final_norm": FINAL_NORM}


def trained_like_params(config, seed: int):
    """float32 params in the checkpoint layout (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from qwen2_jax.params import init_params, param_logical_axes

    params = init_params(config, jax.random.key(seed))
    axes = param_logical_axes(config)
    rng = np.random.RandomState(seed)
    hot = rng.choice(config.hidden_size, OUTLIER_DIMS, replace=False)
    t_std = np.sqrt(5.0 / 3.0)  # std of Student's t with 5 degrees of freedom

    def perturb(path, leaf, names):
        name = path[-1].key
        if name.endswith("_kernel") and "experts" not in [p.key for p in path]:
            if PERTURB["tails"]:
                w = rng.standard_t(5, leaf.shape).astype(np.float32) * (config.initializer_range / t_std)
            else:
                w = np.asarray(leaf, np.float32)
            if not PERTURB["weight_outliers"]:
                return jnp.asarray(w)
            in_axis = (
                names.index("embed")
                if name in ("q_kernel", "k_kernel", "v_kernel", "gate_kernel", "up_kernel")
                else (1 if names[0] == "layers" else 0)
            )
            n_in = leaf.shape[in_axis]
            rows = rng.choice(n_in, max(1, int(WEIGHT_OUTLIER_FRACTION * n_in)), replace=False)
            index = [slice(None)] * leaf.ndim
            index[in_axis] = rows
            w[tuple(index)] *= SETTINGS["weight_outlier"]
            return jnp.asarray(w)
        if name == "scale" and path[0].key != "norm":
            w = np.ones(leaf.shape, np.float32)
            if PERTURB["norm_outliers"]:
                w[..., hot] = NORM_OUTLIER
            return jnp.asarray(w)
        if name == "scale":
            return jnp.full(leaf.shape, SETTINGS["final_norm"], jnp.float32)
        return leaf

    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree_util.tree_unflatten(tree, [perturb(p, leaf, n) for (p, leaf), n in zip(flat, names)])


def _int8_logits_with(config, int8_params, ids, product):
    """Logits of the int8 params with `product` standing in for `matmul.int8_dot`."""
    import jax

    import qwen2_jax
    from qwen2_jax import matmul

    saved = matmul.int8_dot
    matmul.int8_dot = product
    jax.clear_caches()  # the int8 forward compiled before must be traced again with this product
    try:
        return np.asarray(qwen2_jax.forward(config, int8_params, ids)).reshape(-1, config.vocab_size)
    finally:
        matmul.int8_dot = saved
        jax.clear_caches()


def _int8_weights_only_logits(config, int8_params, ids):
    """Logits with every int8 kernel dequantized and multiplied in float32 (the activations exact)."""
    import jax.numpy as jnp

    from qwen2_jax import matmul

    def float_dot(rows_mk, values, scale_n, in_first):
        w = values.astype(jnp.float32)
        y = matmul._dot(rows_mk.astype(jnp.float32), w, in_first, jnp.float32)
        return y * scale_n.astype(jnp.float32)

    return _int8_logits_with(config, int8_params, ids, float_dot)


def _int8_kernel_logits(config, int8_params, ids):
    """Logits with every int8 product through the CPU decode kernel (`cpu_kernels.gemv`: activation
    rows as int16 with a scale per row, exact int32 accumulation), the form CPU decode steps use."""
    from qwen2_jax import cpu_kernels

    def kernel_dot(rows_mk, values, scale_n, in_first):
        return cpu_kernels.gemv(rows_mk, values.T if in_first else values, scale_n)

    return _int8_logits_with(config, int8_params, ids, kernel_dot)


def _int8_digits_logits(config, int8_params, ids):
    """Logits with every int8 product in the two-digit form decode steps use without the CPU kernel
    (GPU/TPU; a forward over many positions takes the dequantized form, `matmul.int8_form`)."""
    import functools

    from qwen2_jax import matmul

    return _int8_logits_with(config, int8_params, ids, functools.partial(matmul.int8_dot, form="digits"))


def log_softmax(x):
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def kl(p_logits, q_logits) -> float:
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--weight-outlier", type=float, default=WEIGHT_OUTLIER)
    ap.add_argument("--final-norm", type=float, default=FINAL_NORM)
    ap.add_argument("--plain", default="", help="comma list of perturbations to leave out: " + ",".join(PERTURB))
    ap.add_argument("--checkpoint", default=None, help="measure a trained checkpoint instead")
    ap.add_argument("--data", default=None, help="prepared data directory: sequences from its eval split")
    args = ap.parse_args(argv)
    SETTINGS.update(weight_outlier=args.weight_outlier, final_norm=args.final_norm)
    for name in filter(None, args.plain.split(",")):
        PERTURB[name] = False

    import jax
    import jax.numpy as jnp

    import qwen2_jax
    from qwen2_jax import load_checkpoint
    from qwen2_jax.config import preset
    from qwen2_jax.quantize import quantize_params
    from train.data_loader import PackedTokenSource

    if args.checkpoint:
        config, f32 = load_checkpoint(args.checkpoint, dtype="float32")
        weights = f"checkpoint {args.checkpoint}"
    else:
        config = preset(args.preset)
        f32 = trained_like_params(config, args.seed)
        weights = (
            "Qwen2-0.5B shape, normal(0.02) init"
            + (", t(5) tails" if PERTURB["tails"] else "")
            + (f", 1% outlier input channels x{SETTINGS['weight_outlier']:g}" if PERTURB["weight_outliers"] else "")
            + (
                f", {OUTLIER_DIMS} hidden channels with norm weight {NORM_OUTLIER:g}"
                if PERTURB["norm_outliers"]
                else ""
            )
            + f", final norm {SETTINGS['final_norm']:g}"
        )
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    int8 = quantize_params(config, bf16)

    if args.data:
        source = PackedTokenSource(args.data, split="eval")
        if len(source) < args.rows:
            raise SystemExit(f"{args.data}: the eval split has {len(source)} sequences, fewer than --rows {args.rows}")
        ids = np.stack([np.asarray(source[i]) for i in range(args.rows)])
        sequences = f"eval split of {args.data}"
    else:
        rng = np.random.RandomState(args.seed + 1)
        prompts = [rng.randint(0, min(150000, config.vocab_size), 4).tolist() for _ in range(args.rows)]
        new = qwen2_jax.generate(
            config,
            bf16,
            prompts,
            args.positions - 4,
            temperature=1.0,
            seed=args.seed,
            eos_token_ids=[],
            allow_context_overflow=True,
        )
        ids = np.array([p + t for p, t in zip(prompts, new)])
        sequences = "sampled from the bf16 model at temperature 1"

    logits = {
        name: np.asarray(qwen2_jax.forward(config, p, ids)).reshape(-1, config.vocab_size)
        for name, p in (("bf16", bf16), ("int8", int8), ("f32", f32))
    }
    logits["int8_weights_only"] = _int8_weights_only_logits(config, int8, ids)
    logits["int8_digits"] = _int8_digits_logits(config, int8, ids)
    from qwen2_jax import cpu_kernels

    if jax.default_backend() == "cpu" and cpu_kernels.available():
        logits["int8_kernel"] = _int8_kernel_logits(config, int8, ids)
    top1 = float(np.mean(np.exp(np.max(log_softmax(logits["bf16"]), axis=-1))))
    result = {
        "weights": weights,
        "sequences": sequences,
        "positions": int(ids.size),
        "mean_top1_probability_bf16": top1,
        "kl_int8_bf16": kl(logits["int8"], logits["bf16"]),
        "kl_bf16_int8": kl(logits["bf16"], logits["int8"]),
        "greedy_agreement_int8_bf16": float(np.mean(logits["int8"].argmax(-1) == logits["bf16"].argmax(-1))),
        "kl_int8_digits_bf16": kl(logits["int8_digits"], logits["bf16"]),
        "greedy_agreement_int8_digits_bf16": float(
            np.mean(logits["int8_digits"].argmax(-1) == logits["bf16"].argmax(-1))
        ),
        **(
            {
                "kl_int8_kernel_bf16": kl(logits["int8_kernel"], logits["bf16"]),
                "greedy_agreement_int8_kernel_bf16": float(
                    np.mean(logits["int8_kernel"].argmax(-1) == logits["bf16"].argmax(-1))
                ),
            }
            if "int8_kernel" in logits
            else {}
        ),
        "kl_int8_weights_only_bf16": kl(logits["int8_weights_only"], logits["bf16"]),
        "greedy_agreement_int8_weights_only_bf16": float(
            np.mean(logits["int8_weights_only"].argmax(-1) == logits["bf16"].argmax(-1))
        ),
        "kl_bf16_f32": kl(logits["bf16"], logits["f32"]),
        "greedy_agreement_bf16_f32": float(np.mean(logits["bf16"].argmax(-1) == logits["f32"].argmax(-1))),
        "weight_bytes_bf16": sum(x.nbytes for x in jax.tree.leaves(bf16)),
        "weight_bytes_int8": sum(x.nbytes for x in jax.tree.leaves(int8)),
    }
    print(f"weights: {result['weights']}; sequences: {sequences}")
    print(f"{result['positions']} positions; mean top-1 probability (bf16) {top1:.3f}")
    print(
        f"KL(int8 || bf16) = {result['kl_int8_bf16']:.2e}   KL(bf16 || int8) = {result['kl_bf16_int8']:.2e}   "
        f"greedy agreement {100 * result['greedy_agreement_int8_bf16']:.1f}%"
    )
    if "kl_int8_kernel_bf16" in result:
        agree = 100 * result["greedy_agreement_int8_kernel_bf16"]
        print(
            f"int8, every product through the CPU decode kernel (int16 rows): KL(. || bf16) = "
            f"{result['kl_int8_kernel_bf16']:.2e}   greedy agreement {agree:.1f}%"
        )
    agree = 100 * result["greedy_agreement_int8_digits_bf16"]
    print(
        f"int8, every product as two digits (decode's form on GPU/TPU): KL(. || bf16) = "
        f"{result['kl_int8_digits_bf16']:.2e}   greedy agreement {agree:.1f}%"
    )
    print(
        f"int8 weights, float32 activations: KL(. || bf16) = {result['kl_int8_weights_only_bf16']:.2e}   "
        f"greedy agreement {100 * result['greedy_agreement_int8_weights_only_bf16']:.1f}%"
    )
    print(
        f"for scale: KL(bf16 || f32) = {result['kl_bf16_f32']:.2e}   greedy agreement bf16/f32 "
        f"{100 * result['greedy_agreement_bf16_f32']:.1f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
