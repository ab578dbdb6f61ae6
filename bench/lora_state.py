"""AdamW state of LoRA adapters against full fine-tuning's, from shapes only (jax.eval_shape: nothing
is allocated), for the shipped dense presets; with peft installed, the adapter parameter count is
checked against peft's own LoRA on the same HF config built on torch's meta device. Then the same
for qwen2-train's real training state (`build_run(...).abstract_state()`: the optimizer chain a run
uses, the trained tree, and the frozen base of a LoRA run), full fine-tuning against `lora.rank=R`.

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
    print()
    print("qwen2-train's state (one device, param_dtype float32; int8 rows: param_dtype bfloat16)")
    print("preset        rank  base      optimizer state: LoRA / full        fraction  trained  frozen base")
    for name in args.presets:
        full = train_state_bytes(name)
        for rank in args.ranks:
            # int8 kernels with the embeddings, norms and LM head in param_dtype bfloat16 (QLoRA-style)
            for base, extra in (("float32", ()), ("bfloat16", ()), ("int8", ("param_dtype=bfloat16",))):
                lora_state = train_state_bytes(
                    name, f"lora.rank={rank}", f"lora.alpha={2 * rank}", f"lora.base_dtype={base}", *extra
                )
                print(
                    f"{name:12s} {rank:5d}  {base:8s}  {lora_state['opt_state'] / 2**20:9.1f} / "
                    f"{full['opt_state'] / 2**20:9.1f} MiB  {lora_state['opt_state'] / full['opt_state']:8.2%}"
                    f"  {lora_state['params'] / 2**20:6.1f} MiB  {lora_state['frozen'] / 2**20:8.1f} MiB"
                )


def train_state_bytes(preset_name: str, *overrides: str) -> dict[str, int]:
    """Bytes of each part of a qwen2-train run's TrainState (abstract: nothing allocated)."""
    from train.config import load_config
    from train.loop import build_run

    config = load_config(None, [f"model={preset_name}", "mesh.data=1", "batch_size=1", *overrides])
    state = build_run(config, devices=jax.devices()[:1]).abstract_state()
    return {
        part: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(getattr(state, part)))
        for part in ("params", "opt_state", "frozen")
    }


if __name__ == "__main__":
    main()
