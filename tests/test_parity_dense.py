"""Dense Qwen2 parity against transformers.Qwen2ForCausalLM (float32, every parameter randomised)."""

import json
import os

import numpy as np
import pytest

import qwen2_jax
from hf_utils import hf_dense_config, hf_logits, make_hf_model, rel_err
from qwen2_jax.forward import forward_outputs
from tolerances import BATCH_REL, BF16_KL_RATIO, BLOCKED_ATTENTION_ATOL, PARITY_REL

TOL = PARITY_REL  # measured noise floor x margin: tests/tolerances.py (the bar was 1e-4)

CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa7": dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # max_position_embeddings below the sequence length, so the dynamic base actually grows
    "rope-dynamic": dict(max_position_embeddings=12, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "rope-yarn": dict(
        max_position_embeddings=64,
        rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "sliding": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=4),
    "sliding-all-tied": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0, tie_word_embeddings=True),
}
SEQ = 20


def _batch(vocab, seed=0):
    """Row 0 full, row 1 left-padded, row 2 right-padded, row 3 padded on both sides of a short row."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (4, SEQ))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, -6:] = 0
    mask[3, :3] = 0
    mask[3, -4:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    hf_cfg = hf_dense_config(**CASES[request.param])
    model = make_hf_model(hf_cfg, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="40KB")
    return request.param, model, str(path)


def test_logits_and_hidden_states_match_hf(case):
    name, model, path = case
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask = _batch(config.vocab_size)
    ref_logits, ref_hidden = hf_logits(model, ids, mask, output_hidden_states=True)
    out = forward_outputs(config, params, ids, mask, output_hidden_states=True)
    real = mask.astype(bool)
    assert rel_err(np.asarray(out["logits"])[real], ref_logits[real]) < TOL, name
    assert len(out["hidden_states"]) == len(ref_hidden) == config.num_hidden_layers + 1
    for layer, (ours, ref) in enumerate(zip(out["hidden_states"], ref_hidden)):
        assert rel_err(np.asarray(ours)[real], ref[real]) < TOL, f"{name}: hidden state {layer}"


def test_padding_never_changes_real_tokens(case):
    _, _, path = case
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask = _batch(config.vocab_size, seed=1)
    batched = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    assert np.isfinite(batched).all(), "padding positions must not produce NaN/inf"
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = np.asarray(qwen2_jax.forward(config, params, ids[row : row + 1, real]))[0]
        padded = np.asarray(qwen2_jax.forward(config, params, ids[row : row + 1], mask[row : row + 1]))[0]
        np.testing.assert_allclose(padded[real], alone, rtol=0, atol=BATCH_REL * np.abs(alone).max())
        if config.rope_scaling.rope_type != "dynamic":
            # dynamic NTK scales by the longest row of the batch (as HF does), so only the others
            # are batch-invariant
            # not batch-invariant in float32: XLA's accumulation order depends on the shapes (tolerances.py)
            np.testing.assert_allclose(batched[row, real], alone, rtol=0, atol=BATCH_REL * np.abs(alone).max())


def test_transformers_4x_config_spelling_loads_the_same(case, tmp_path):
    """config.json as transformers 4.x wrote it: rope_theta + rope_scaling with the old `type` key."""
    name, model, path = case
    with open(os.path.join(path, "config.json")) as f:
        v5 = json.load(f)
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        rope["type"] = rope.pop("rope_type")
        v4["rope_scaling"] = rope
    v4["torch_dtype"] = "float32"
    for fname in os.listdir(path):
        os.symlink(os.path.join(path, fname), tmp_path / fname) if fname != "config.json" else None
    with open(tmp_path / "config.json", "w") as f:
        json.dump(v4, f)
    config_v5, params = qwen2_jax.load_checkpoint(path)
    config_v4, _ = qwen2_jax.load_checkpoint(str(tmp_path))
    assert config_v4 == config_v5, name
    ids, mask = _batch(config_v4.vocab_size, seed=2)
    a = np.asarray(qwen2_jax.forward(config_v4, params, ids, mask))
    b = np.asarray(qwen2_jax.forward(config_v5, params, ids, mask))
    np.testing.assert_array_equal(a, b)


def test_bfloat16_kl_against_hf_fp32(tmp_path, capsys):
    """Ours in bf16 should be as close to HF fp32 as HF's own bf16 run is (facts §6.2)."""
    import torch
    from transformers import Qwen2ForCausalLM

    hf_cfg = hf_dense_config(
        num_hidden_layers=4,
        hidden_size=128,
        intermediate_size=256,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = make_hf_model(hf_cfg, seed=3)
    model.save_pretrained(tmp_path)
    ids, mask = _batch(hf_cfg.vocab_size, seed=3)
    ref32 = hf_logits(model, ids, mask)
    hf16 = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert hf16.model.rotary_emb.inv_freq.dtype == torch.float32
    ref16 = hf_logits(hf16, ids, mask)
    config, params = qwen2_jax.load_checkpoint(str(tmp_path), dtype="bfloat16")
    assert params["embed_tokens"].dtype.name == "bfloat16"
    ours16 = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    real = mask.astype(bool)

    def kl(p_logits, q_logits):  # KL(p || q) averaged over real tokens
        lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
        lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
        return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))

    kl_ours = kl(ours16[real].astype(np.float64), ref32[real].astype(np.float64))
    kl_hf = kl(ref16[real].astype(np.float64), ref32[real].astype(np.float64))
    with capsys.disabled():
        print(f"\nKL(ours_bf16 || HF_fp32) = {kl_ours:.3e}   KL(HF_bf16 || HF_fp32) = {kl_hf:.3e}")
    assert kl_ours < BF16_KL_RATIO * kl_hf + 1e-6


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_attention_heads=4, num_key_value_heads=2),
        # a window wider than one query block, on some layers only: windows cross block boundaries
        dict(use_sliding_window=True, sliding_window=70, max_window_layers=1, num_hidden_layers=3),
    ],
)
def test_long_sequences_match_hf(overrides, tmp_path):
    """Sequences longer than attention's causal query blocks (CPU runs queries in blocks of 64)."""
    model = make_hf_model(hf_dense_config(max_position_embeddings=512, **overrides), seed=11)
    model.save_pretrained(tmp_path)
    config, params = qwen2_jax.load_checkpoint(str(tmp_path))
    rng = np.random.RandomState(3)
    ids = rng.randint(0, config.vocab_size, (3, 203))
    mask = np.ones_like(ids)
    mask[1, :90] = 0  # left padding longer than a block
    mask[2, -70:] = 0
    ref = hf_logits(model, ids, mask)
    out = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    real = mask.astype(bool)
    assert rel_err(out[real], ref[real]) < TOL


def test_blocked_attention_equals_one_block():
    """attention_core's causal query blocks give dot_product_attention's numbers for any causal mask."""
    import jax
    import jax.numpy as jnp

    from qwen2_jax.layers import attention_core, attention_mask

    rng = np.random.RandomState(0)
    b, t, n, k, h = 2, 150, 4, 2, 16
    q, kk, v = (jnp.asarray(rng.randn(b, t, m, h).astype(np.float32)) for m in (n, k, k))
    valid = np.ones((b, t), bool)
    valid[1, :40] = False
    pos = jnp.asarray(np.where(valid, np.cumsum(valid, 1) - 1, -1))
    for window in (None, 33):
        mask = attention_mask(jnp.arange(t), pos, jnp.arange(t), pos, window)
        blocked = attention_core(q, kk, v, mask, 0.25)
        whole = jax.nn.dot_product_attention(q, kk, v, mask=mask, scale=0.25)
        real = valid
        np.testing.assert_allclose(
            np.asarray(blocked)[real], np.asarray(whole)[real], rtol=0, atol=BLOCKED_ATTENTION_ATOL
        )
