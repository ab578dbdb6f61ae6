"""Parity and generation on an accelerator: our GPU/TPU forward pass and greedy decode against HF
transformers (PyTorch, float32, CPU) on small random models with every parameter randomised.

    python bench/gpu_parity.py            # prints one line per case and exits 1 if any is off

Float32 matmuls run at "highest" precision: XLA's default on NVIDIA GPUs lets float32 products
use TF32 (10-bit mantissa), which moves logits by ~1e-3 relative; the check sets it explicitly and
also reports the default-precision error so users know what they get without it.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> int:
    import tempfile

    import jax

    import qwen2_jax
    from hf_utils import hf_dense_config, hf_logits, hf_moe_config, make_hf_model, rel_err

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, (4, 40))
    mask = np.ones_like(ids)
    mask[1, :13] = 0  # left padding
    mask[2, 30:] = 0  # right padding
    real = mask.astype(bool)
    moe_cfg = hf_moe_config(mlp_only_layers=[1])
    cases = {
        "dense gqa2": (hf_dense_config(), False),
        "dense sliding tied": (
            hf_dense_config(use_sliding_window=True, sliding_window=9, max_window_layers=1, tie_word_embeddings=True),
            False,
        ),
        "moe": (moe_cfg, True),
    }
    failures = 0
    for name, (hf_cfg, moe) in cases.items():
        model = make_hf_model(hf_cfg, seed=3, moe=moe)
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            config, params = qwen2_jax.load_checkpoint(path)
        ref = hf_logits(model, ids, mask)
        for precision in ("highest", "default"):
            with jax.default_matmul_precision(precision):
                ours = np.asarray(qwen2_jax.forward(config, params, ids, mask))
            err = rel_err(ours[real], ref[real])
            bad = precision == "highest" and err > 1e-4
            failures += bad
            print(
                f"{name:20s} logits rel err ({precision:7s} precision): {err:.2e}{'  FAIL' if bad else ''}", flush=True
            )
        with jax.default_matmul_precision("highest"):
            prompts = [ids[0, :17].tolist(), ids[3, :5].tolist()]
            ours = qwen2_jax.generate(config, params, prompts, 12, eos_token_ids=[])
        agree = 0
        for prompt, tokens in zip(prompts, ours):
            seq = prompt + tokens
            logits = hf_logits(model, np.array([seq]))[0]
            steps = [int(np.argmax(logits[len(prompt) - 1 + i])) == t for i, t in enumerate(tokens)]
            agree += all(steps)
        failures += agree != len(prompts)
        print(f"{name:20s} greedy decode equals HF teacher-forced argmax: {agree}/{len(prompts)} prompts", flush=True)
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
