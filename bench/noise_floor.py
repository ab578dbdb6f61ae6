"""Float32 noise floor of the dense parity/padding tests, per layer, under each XLA:CPU ISA cap.

For each case of tests/test_parity_dense.py (the padding test's batch: 4 rows, left/right/both padded)
it prints, per hidden state (0 = embeddings, last = after the final norm) and for the logits, the worst
row's max |a - b| / max |b| for:

  hf b/1    HF batched (padded)       vs HF on the row alone (unpadded): HF's own batch noise
  ours b/1  ours batched              vs ours on the row alone: what test_padding_never_changes_real_tokens checks
  hf/64     HF float32 batched        vs HF float64 batched: HF's distance from exact arithmetic
  ours/64   ours float32 batched      vs HF float64 batched: ours' distance from exact arithmetic
  ours/hf   ours float32 batched      vs HF float32 batched: what test_logits_and_hidden_states_match_hf checks
  hf loc    HF float32 layer i        vs HF's float64 layer i, both given HF's float32 state i-1 (batched)
  ours loc  ours float32 layer i      vs HF's float64 layer i, both given ours' float32 state i-1 (batched)

The two `loc` columns compare the rounding error each implementation adds in one layer (the final norm
counts with the last layer, the LM head with the logits) without the amplification of earlier errors.

XLA_FLAGS must be set before jax is imported, so each ISA runs in a subprocess:

    .venv/bin/python bench/noise_floor.py                       # every case, ISAs default SSE4_2 AVX AVX2 AVX512
    .venv/bin/python bench/noise_floor.py --cases gqa7 --isas default,AVX2 --layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("default", "SSE4_2", "AVX", "AVX2", "AVX512")
METRICS = ("hf b/1", "ours b/1", "hf/64", "ours/64", "ours/hf", "hf loc", "ours loc")


def _rel(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def measure(case_names):
    """Runs in the child process (XLA_FLAGS already set). Returns {case: {metric: [per layer..., logits]}}."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import numpy as np
    import torch

    import qwen2_jax
    from hf_utils import hf_dense_config, hf_logits, make_hf_model
    from qwen2_jax.forward import forward_outputs
    from test_parity_dense import CASES, _batch

    assert qwen2_jax.__file__.startswith(ROOT), qwen2_jax.__file__
    results = {}
    for name in case_names:
        model = make_hf_model(hf_dense_config(**CASES[name]), seed=len(name))  # as the test's fixture
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            config, params = qwen2_jax.load_checkpoint(path)
        model64 = make_hf_model(hf_dense_config(**CASES[name]), seed=len(name)).to(torch.float64)
        ids, mask = _batch(config.vocab_size, seed=1)  # the padding test's batch

        def ours(i, m=None):
            out = forward_outputs(config, params, i, m, output_hidden_states=True)
            return [np.asarray(h) for h in out["hidden_states"]] + [np.asarray(out["logits"])]

        def hf(model, i, m=None):
            logits, hidden = hf_logits(model, i, m, output_hidden_states=True)
            return list(hidden) + [logits]

        def hf64(i, m):
            ids_t = torch.as_tensor(i)
            mask_t = torch.as_tensor(m)
            pos = (mask_t.cumsum(-1) - 1).clamp(min=0) * mask_t
            with torch.no_grad():
                out = model64(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, output_hidden_states=True)
            return [h.numpy() for h in out.hidden_states] + [out.logits.numpy()]

        def exact_layer(i, m, state):
            """HF float64 layer i (0 = embeddings: exact anyway; last = last layer + final norm; then the
            LM head) applied to a float32 state, batched."""
            x = torch.as_tensor(np.asarray(state, np.float64))
            layers = model64.model.layers
            if i == 0:
                return hf64(ids, m)[0]
            if i == len(layers) + 1:  # logits from the final state
                with torch.no_grad():
                    return model64.lm_head(x).numpy()

            def feed(module, args, kwargs):
                return (x,) + tuple(args[1:]), kwargs

            captured = {}
            hook = layers[i - 1].register_forward_pre_hook(feed, with_kwargs=True)
            grab = layers[i - 1].register_forward_hook(lambda mod, a, out: captured.setdefault("h", out))
            try:
                full = hf64(ids, m)
            finally:
                hook.remove()
                grab.remove()
            h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
            return full[i] if i == len(layers) else h.numpy()

        ours_b, hf_b, hf_64 = ours(ids, mask), hf(model, ids, mask), hf64(ids, mask)
        n = len(ours_b)
        ours_loc = [exact_layer(i, mask, ours_b[i - 1] if i else None) for i in range(n)]
        hf_loc = [exact_layer(i, mask, hf_b[i - 1] if i else None) for i in range(n)]
        per = {m: [0.0] * n for m in METRICS}
        dynamic = config.rope_scaling.rope_type == "dynamic"
        for row in range(ids.shape[0]):
            real = mask[row].astype(bool)
            alone_ids = ids[row : row + 1, real]
            ours_1, hf_1 = ours(alone_ids), hf(model, alone_ids)
            for layer in range(n):
                vals = {
                    "hf/64": _rel(hf_b[layer][row, real], hf_64[layer][row, real]),
                    "ours/64": _rel(ours_b[layer][row, real], hf_64[layer][row, real]),
                    "ours/hf": _rel(ours_b[layer][row, real], hf_b[layer][row, real]),
                    "hf loc": _rel(hf_b[layer][row, real], hf_loc[layer][row, real]),
                    "ours loc": _rel(ours_b[layer][row, real], ours_loc[layer][row, real]),
                }
                if not dynamic:  # dynamic NTK depends on the batch's longest row: not batch-invariant
                    vals["hf b/1"] = _rel(hf_b[layer][row, real], hf_1[layer][0])
                    vals["ours b/1"] = _rel(ours_b[layer][row, real], ours_1[layer][0])
                for m, v in vals.items():
                    per[m][layer] = max(per[m][layer], v)
        results[name] = per
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--isas", default=",".join(ISAS))
    ap.add_argument("--layers", action="store_true", help="print every layer, not only the worst and the logits")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.cases.split(","))))
        return
    if not args.cases:
        sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from test_parity_dense import CASES

        args.cases = ",".join(sorted(CASES))
    table = {}
    for isa in args.isas.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + ("" if isa == "default" else f" --xla_cpu_max_isa={isa}")
        ).strip()
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--cases", args.cases],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        table[isa] = json.loads(out.strip().splitlines()[-1])
    for name in args.cases.split(","):
        print(f"\n== {name}: worst row's max|a-b|/max|b|   (h0 = embeddings, hL = after final norm)")
        print(f"{'isa':8s} {'where':7s} " + " ".join(f"{m:>9s}" for m in METRICS) + "   b/1 ratio  loc ratio")
        for isa, res in table.items():
            per = res[name]
            n = len(per[METRICS[0]])
            worst = max(range(n - 1), key=lambda i: per["ours b/1"][i])
            rows = list(range(n)) if args.layers else [worst, n - 1]
            for i in rows:
                where = "logits" if i == n - 1 else f"h{i}"
                hf_bs = per["hf b/1"][i]
                ratio = per["ours b/1"][i] / hf_bs if hf_bs > 0 else float("nan")
                loc = per["ours loc"][i] / per["hf loc"][i] if per["hf loc"][i] > 0 else float("nan")
                print(
                    f"{isa:8s} {where:7s} "
                    + " ".join(f"{per[m][i]:9.2e}" for m in METRICS)
                    + f"   {ratio:9.2f}  {loc:9.2f}"
                )


if __name__ == "__main__":
    main()
