"""Are the suite's tolerances still tight enough to catch real bugs? Deliberately broken models, measured.

Takes the dense parity cases of tests/test_parity_dense.py, breaks our side in ways a port can go wrong
(a missing bias, a norm weight not applied, a wrong epsilon, a wrong softmax scale, a wrong RoPE base,
padding that leaks into real tokens, a small weight error) and prints, for each, the same metric the
tests assert (max |ours - HF| / max |HF| over real tokens, or batched vs alone for the padding bug)
next to the tolerance in tests/tolerances.py. `caught` must be yes for every real bug.

    .venv/bin/python bench/broken_models.py [--cases gqa7,mha-untied]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gqa7,mha-untied,sliding")
    args = ap.parse_args()

    import jax
    import numpy as np

    import qwen2_jax
    import tolerances as tol
    from hf_utils import hf_dense_config, hf_logits, make_hf_model, rel_err
    from test_parity_dense import CASES, _batch

    def edit(params, path, fn):
        params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = fn(node[path[-1]])
        return params

    attn = ("layers", "self_attn")
    bugs = {
        "q bias missing": lambda c, p: (c, edit(p, attn + ("q_bias",), lambda x: 0 * x)),
        "v bias missing": lambda c, p: (c, edit(p, attn + ("v_bias",), lambda x: 0 * x)),
        "final norm weight not applied": lambda c, p: (c, edit(p, ("norm", "scale"), lambda x: 0 * x + 1)),
        "softmax scale 1% off (q * 1.01)": lambda c, p: (
            c,
            edit(edit(p, attn + ("q_kernel",), lambda x: 1.01 * x), attn + ("q_bias",), lambda x: 1.01 * x),
        ),
        "rope_theta 1% off": lambda c, p: (c.replace(rope_theta=c.rope_theta * 1.01), p),
        "rms_norm_eps 1e-5 for 1e-6": lambda c, p: (c.replace(rms_norm_eps=1e-5), p),
        "lm_head weights * (1 + 1e-3)": lambda c, p: (
            c,
            edit(p, ("embed_tokens",) if c.tie_word_embeddings else ("lm_head",), lambda x: x * (1 + 1e-3)),
        ),
        "lm_head weights * (1 + 1e-4)": lambda c, p: (
            c,
            edit(p, ("embed_tokens",) if c.tie_word_embeddings else ("lm_head",), lambda x: x * (1 + 1e-4)),
        ),
    }
    print(f"{'case':12s} {'bug':34s} {'metric':>9s} {'tolerance':>9s}  caught")
    for name in args.cases.split(","):
        model = make_hf_model(hf_dense_config(**CASES[name]), seed=len(name))
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            config, params = qwen2_jax.load_checkpoint(path)
        ids, mask = _batch(config.vocab_size)
        real = mask.astype(bool)
        ref = hf_logits(model, ids, mask)
        base = rel_err(np.asarray(qwen2_jax.forward(config, params, ids, mask))[real], ref[real])
        print(
            f"{name:12s} {'(none: the real model)':34s} {base:9.2e} {tol.PARITY_REL:9.1e}  "
            f"{'YES: tolerance too tight' if base >= tol.PARITY_REL else 'no (right)'}"
        )
        for bug, apply in bugs.items():
            c, p = apply(config, params)
            err = rel_err(np.asarray(qwen2_jax.forward(c, p, ids, mask))[real], ref[real])
            print(f"{name:12s} {bug:34s} {err:9.2e} {tol.PARITY_REL:9.1e}  {'yes' if err >= tol.PARITY_REL else 'NO'}")
        # padding bug: the padded row's padding treated as real tokens (attended, and shifting positions)
        row = 1
        keep = mask[row].astype(bool)
        alone = np.asarray(qwen2_jax.forward(config, params, ids[row : row + 1, keep]))[0]
        leaky = np.asarray(qwen2_jax.forward(config, params, ids[row : row + 1]))[0][keep]
        err = float(np.abs(leaky - alone).max() / np.abs(alone).max())
        print(
            f"{name:12s} {'padding visible to real tokens':34s} {err:9.2e} {tol.BATCH_REL:9.1e}  "
            f"{'yes' if err >= tol.BATCH_REL else 'NO'}"
        )


if __name__ == "__main__":
    main()
