"""Helpers for parity tests: tiny random HF models with *every* parameter randomised."""

from __future__ import annotations

import numpy as np
import torch


def randomize_all(model, seed: int = 0, scale: float = 0.2):
    """HF init leaves biases at 0 and norms at 1, which would hide bias and norm bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


# The shape every tiny test model starts from (dense and MoE).
TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def hf_dense_config(**overrides):
    from transformers import Qwen2Config as HFQwen2Config

    base = dict(TINY_SHAPE, rms_norm_eps=1e-6, rope_theta=10000.0)
    rope = overrides.pop("rope_scaling", None)
    base.update(overrides)
    theta = base.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if rope:
        rope_parameters = {**rope, "rope_theta": theta}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    return HFQwen2Config(rope_parameters=rope_parameters, **base)


def hf_moe_config(**overrides):
    from transformers import Qwen2MoeConfig

    base = dict(
        TINY_SHAPE,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        mlp_only_layers=[],
    )
    base.update(overrides)
    return Qwen2MoeConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **base)


def make_hf_model(hf_config, seed: int = 0, moe: bool = False):
    from transformers import Qwen2ForCausalLM, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cls = Qwen2MoeForCausalLM if moe else Qwen2ForCausalLM
    model = cls(hf_config).to(torch.float32).eval()
    randomize_all(model, seed)
    if hf_config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def save_tiny_chat_model(path, tokenizer, *, tie_word_embeddings: bool, seed: int = 0, scale: float = 0.05):
    """A random tiny Qwen2 (every parameter random) saved with Qwen2's tokenizer into an HF directory: the
    checkpoint the SFT, DPO and LoRA tests start from. Returns the torch model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151680,  # the tokenizer's 151,646 ids, rounded up
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = randomize_all(Qwen2ForCausalLM(config), seed=seed, scale=scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def hf_logits(model, input_ids, attention_mask=None, output_hidden_states=False):
    """HF logits with explicit positions counting real tokens only (as HF generate does)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=output_hidden_states)
    if output_hidden_states:
        return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]
    return out.logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
