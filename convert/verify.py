"""--verify: run the HF torch model and ours on one random sequence and compare the logits.

Both run in float32 from the stored weights (bfloat16 and float16 widen to float32 exactly), so
the comparison sees conversion errors and nothing else: in half precision two correct
implementations already differ by several percent on small random models, which would hide a
mistake in one tensor. The bar is therefore the float32 parity bar whatever the stored dtype.
Memory: both models in float32 (8 bytes per parameter), so use it on models that fit.
"""

from __future__ import annotations

import numpy as np

from qwen2_jax import forward, load_checkpoint
from qwen2_jax.orbax_checkpoint import open_checkpoint

COMPUTE_DTYPE = "float32"
TOLERANCE = {"float32": 1e-4}  # max |ours - hf| / max |hf|, by compute dtype


def compare(hf_dir: str, orbax_dir: str, seq_len: int = 16, seed: int = 0):
    """(max relative difference, tolerance, description), or None if torch/transformers are missing."""
    try:  # optional: torch and transformers are test dependencies, not the library's
        import torch
        import transformers
    except ImportError:
        return None

    stored = open_checkpoint(orbax_dir).dtype
    config, params = load_checkpoint(orbax_dir, dtype=COMPUTE_DTYPE)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len))
    ours = np.asarray(forward(config, params, ids), np.float64)
    del params
    transformers.utils.logging.disable_progress_bar()  # its loading bar is noise on our stderr
    # Loaded in the stored dtype first, so a source in another dtype is rounded exactly as ours was.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, stored), use_safetensors=True, trust_remote_code=False
    )
    model = model.to(getattr(torch, COMPUTE_DTYPE)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)).logits.double().numpy()
    rel = float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
    return rel, TOLERANCE[COMPUTE_DTYPE], f"{stored} weights, computed in {COMPUTE_DTYPE}"
