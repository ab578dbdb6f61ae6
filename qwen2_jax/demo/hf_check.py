"""The demo's transformers side: an exported HF directory loaded with transformers, greedy continuation.

Imported only when transformers (and torch) can be imported; the demo skips the stage otherwise.
"""

from __future__ import annotations

import importlib.util
import os


def transformers_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def hf_greedy(hf_dir: str, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, new token ids) of `AutoModelForCausalLM.generate(do_sample=False)` in float32,
    the prompt tokenized with `AutoTokenizer` from the same directory. The new tokens end with the
    stop token when one was produced, as qwen2-generate's do."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos if isinstance(eos, int) else (eos or [0])[0],
        )
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()
