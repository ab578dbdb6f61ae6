"""cuDNN fused attention (the GPU training / prefill path) against XLA's attention, bfloat16: same
outputs and gradients within bfloat16 rounding, with padding and a sliding window.

    python bench/gpu_attention.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import jax
    import jax.numpy as jnp

    from qwen2_jax.layers import attention_core, attention_mask

    b, t, n, k, h = 2, 256, 14, 2, 64
    keys = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (b, t, heads, h), jnp.bfloat16) for key, heads in zip(keys, (n, k, k)))
    valid = np.ones((b, t), bool)
    valid[1, :40] = False  # left padding
    pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0) * valid
    k_pos = np.where(valid, pos, -1)
    failures = 0
    for window in (None, 50):
        mask = attention_mask(jnp.arange(t), jnp.asarray(pos), jnp.arange(t), jnp.asarray(k_pos), window)

        def loss(q, kk, v, fused, mask=mask):
            if fused:
                out = attention_core(q, kk, v, mask, h**-0.5)
            else:
                out = jax.nn.dot_product_attention(q, kk, v, mask=mask, scale=h**-0.5, implementation=None)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        results = {}
        for fused in (True, False, "f32"):
            args = (q, kk, v) if fused != "f32" else tuple(x.astype(jnp.float32) for x in (q, kk, v))
            (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(
                *args, fused is True
            )
            results[fused] = [np.asarray(x, np.float32) for x in (out, *grads)]
        real = valid[:, :, None, None]  # padding rows (queries that see no key, keys no query sees) are arbitrary
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            ref = results["f32"][i] * real
            errs = [float(np.max(np.abs(results[f][i] * real - ref)) / np.max(np.abs(ref))) for f in (True, False)]
            bad = errs[0] > 2 * errs[1] + 1e-2  # the fused kernel may not be less exact than XLA's bf16 path
            failures += bad
            print(
                f"window {window}: {name} rel err vs float32: fused {errs[0]:.2e}, XLA bf16 {errs[1]:.2e}"
                f"{'  FAIL' if bad else ''}",
                flush=True,
            )
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
