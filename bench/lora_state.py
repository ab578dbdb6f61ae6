"""AdamW state of LoRA adapters against full fine-tuning's, from shapes only (jax.eval_shape: nothing
is allocated), for the shipped dense presets; with peft installed, the adapter parameter count is
checked against peft's own LoRA on the same HF config built on torch's meta device.

    .venv/bin/python bench/lora_state.py [--presets qwen2-0.5b qwen2-7b] [--ranks 8 16 64]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

from qwen2_jax import lora
from qwen2_jax.config import preset
from qwen2_jax.params import abstract_params


def state_bytes(tx, abstract) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, abstract)))


def peft_trainable(config, lora_config) -> int | None:
    """peft's trainable parameter count for the same LoRA on the HF model (meta device), or None."""
    try:
        import peft
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    hf_config = AutoConfig.for_model(**config.to_hf())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora_config.rank, lora_alpha=lora_config.alpha, target_modules=list(lora_config.target_modules)
        ),
    )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    args = parser.parse_args()
    tx = optax.adamw(1e-4)
    print("preset        rank  adapter params  peft's count  AdamW state: LoRA / full          fraction")
    for name in args.presets:
        config = preset(name)
        full = state_bytes(tx, abstract_params(config, jnp.float32))
        for rank in args.ranks:
            lora_config = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
            abstract = lora.abstract_adapters(config, lora_config)
            count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
            theirs = peft_trainable(config, lora_config)
            check = "-" if theirs is None else ("equal" if theirs == count else f"DIFFERS: {theirs}")
            ours = state_bytes(tx, abstract)
            print(
                f"{name:12s} {rank:5d} {count:15,d}  {check:12s}  {ours / 2**20:9.1f} / {full / 2**20:9.1f} MiB"
                f"  {ours / full:8.2%}"
            )


if __name__ == "__main__":
    main()
