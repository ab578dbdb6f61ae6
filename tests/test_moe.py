"""Qwen2-MoE parity against transformers.Qwen2MoeForCausalLM (float32, every parameter randomised):
logits, router logits and HF's aux loss, through checkpoints HF itself wrote (save_pretrained)."""

import numpy as np
import pytest
import torch

import qwen2_jax
from hf_utils import hf_logits, hf_moe_config, make_hf_model, rel_err
from qwen2_jax.forward import forward_outputs
from qwen2_jax.moe import aux_loss, moe_loss, router_z_loss
from qwen2_jax.options import RunOptions
from tolerances import AUX_ATOL, BATCH_REL, LOSS_RTOL, PARITY_REL

TOL = PARITY_REL  # measured noise floor x margin: tests/tolerances.py (the bar was 1e-4)
AUX_TOL = AUX_ATOL
SEQ = 14

CASES = {
    # top-k 1..4, norm_topk_prob on/off, decoder_sparse_step 2, mlp_only_layers; padding in every case
    "k1-norm": dict(num_experts_per_tok=1, norm_topk_prob=True),
    "k2": dict(num_experts_per_tok=2),
    "k3-norm-step2": dict(num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4),
    "k4-mlp-only": dict(num_experts_per_tok=4, mlp_only_layers=[0, 2], num_hidden_layers=4, tie_word_embeddings=True),
}


def make_hf_moe(hf_cfg, seed=0, router_scale=4.0):
    """Randomised model with a decisive router (large router weights: no near-ties in top-k)."""
    model = make_hf_model(hf_cfg, seed=seed, moe=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_scale)
    return model


def _batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (3, SEQ))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return ids, mask


def _hf_outputs(model, ids, mask):
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0) * mask_t
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, output_router_logits=True)


def _min_topk_gap(router_logits, k, mask):
    """Smallest logit gap between the k-th and (k+1)-th expert over real tokens (float32 noise: ~1e-6)."""
    if k >= router_logits.shape[-1]:
        return np.inf
    top = torch.topk(router_logits.float(), k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k]).numpy()
    return float(gap[mask.reshape(-1).astype(bool)].min())


_BUILT = {}


def _build(name, tmp_path_factory):
    if name not in _BUILT:
        hf_cfg = hf_moe_config(**CASES[name])
        model = make_hf_moe(hf_cfg, seed=len(name))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="100KB")
        _BUILT[name] = (name, model, str(path))
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


def _some_slow(fast):
    """Every case, those not in `fast` under @slow (each compiles new shapes: keep the default run short)."""
    return [pytest.param(n, marks=() if n in fast else pytest.mark.slow) for n in sorted(CASES)]


def test_checkpoint_has_per_expert_keys(case):
    """transformers 5 fuses experts in memory but save_pretrained writes HF's per-expert keys."""
    import glob
    import os

    from safetensors import safe_open

    _, model, path = case
    keys = set()
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(f, "np") as s:
            keys |= set(s.keys())
    sparse = [
        i
        for i in range(model.config.num_hidden_layers)
        if i not in model.config.mlp_only_layers and (i + 1) % model.config.decoder_sparse_step == 0
    ]
    i = sparse[0]
    assert f"model.layers.{i}.mlp.experts.0.gate_proj.weight" in keys
    assert f"model.layers.{i}.mlp.shared_expert_gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_logits_router_logits_and_aux_loss_match_hf(case):
    name, model, path = case
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask = _batch(config.vocab_size)
    ref = _hf_outputs(model, ids, mask)
    k = config.num_experts_per_tok
    for layer_logits in ref.router_logits:
        # smallest gap measured: 2.3e-3 (k3-norm-step2); router-logit noise is ~1e-6 relative
        assert _min_topk_gap(layer_logits, k, mask) > 1e-3, f"{name}: router not decisive, parity would be luck"
    out = forward_outputs(config, params, ids, mask, output_router_logits=True)
    real = mask.astype(bool)
    assert rel_err(np.asarray(out["logits"])[real], ref.logits.numpy()[real]) < TOL, name

    sparse = [i for i in range(config.num_hidden_layers) if config.is_sparse_layer(i)]
    assert len(out["router_logits"]) == len(ref.router_logits) == len(sparse)
    for ours, theirs in zip(out["router_logits"], ref.router_logits):
        ours = np.asarray(ours).reshape(-1, config.num_experts)
        assert rel_err(ours[real.reshape(-1)], theirs.numpy()[real.reshape(-1)]) < TOL

    ours_aux = float(aux_loss(config, out, mask))
    assert abs(ours_aux - float(ref.aux_loss)) < AUX_TOL, (name, ours_aux, float(ref.aux_loss))
    # training adds router_aux_loss_coef * aux; HF's loss with labels does the same
    np.testing.assert_allclose(
        float(moe_loss(config, out["router_logits"], mask)),
        config.router_aux_loss_coef * float(ref.aux_loss),
        rtol=LOSS_RTOL,
    )
    z = float(router_z_loss(out["router_logits"], mask))
    assert np.isfinite(z) and z > 0


def test_aux_loss_without_mask_matches_hf(case):
    _, model, path = case
    config, params = qwen2_jax.load_checkpoint(path)
    ids, _ = _batch(config.vocab_size, seed=1)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids), output_router_logits=True)
    out = forward_outputs(config, params, ids, output_router_logits=True)
    assert abs(float(aux_loss(config, out)) - float(ref.aux_loss)) < AUX_TOL


@pytest.mark.parametrize("name", _some_slow(set()))  # padding vs HF is in the parity test
def test_padding_never_changes_real_tokens(name, tmp_path_factory):
    _, _, path = _build(name, tmp_path_factory)
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask = _batch(config.vocab_size, seed=2)
    padded = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    for row in (1, 2):
        real = mask[row].astype(bool)
        alone = np.asarray(qwen2_jax.forward(config, params, ids[row : row + 1, real]))[0]
        np.testing.assert_allclose(padded[row, real], alone, rtol=0, atol=BATCH_REL * np.abs(alone).max())


@pytest.mark.parametrize("name", _some_slow({"k4-mlp-only"}))
def test_greedy_generation_equals_hf(name, tmp_path_factory):
    """HF greedy generate; ours reproduces every token (teacher-forced argmax, and generate() if present)."""
    _, model, path = _build(name, tmp_path_factory)
    config, params = qwen2_jax.load_checkpoint(path)
    prompt = np.random.RandomState(5).randint(0, config.vocab_size, (1, 6))
    new = 8
    with torch.no_grad():
        hf = model.generate(
            torch.as_tensor(prompt),
            attention_mask=torch.ones_like(torch.as_tensor(prompt)),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    hf = hf.numpy()
    hf_new = hf[0, prompt.shape[1] :]
    logits = np.asarray(qwen2_jax.forward(config, params, hf))
    ours = logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    np.testing.assert_array_equal(ours, hf_new)
    if hasattr(qwen2_jax, "generate"):
        got = qwen2_jax.generate(config, params, [prompt[0].tolist()], new, temperature=0.0)
        assert list(got[0]) == hf_new.tolist()


@pytest.mark.parametrize(
    "name,axes",
    [
        ("k2", dict(data=2, expert=4)),
        pytest.param("k3-norm-step2", dict(fsdp=2, expert=2, tensor=2), marks=pytest.mark.slow),
    ],
)
def test_loaded_onto_an_expert_mesh_matches_hf(name, axes, tmp_path_factory):
    """load_checkpoint(mesh=...) shards experts over `expert`; the forward then runs expert-parallel."""
    from qwen2_jax.sharding import make_mesh

    _, model, path = _build(name, tmp_path_factory)
    config, params = qwen2_jax.load_checkpoint(path, mesh=make_mesh(**axes))
    seg = next(k for k in params if k.startswith("layers"))
    experts = params[seg]["mlp"]["experts"]["gate_kernel"] if "experts" in params[seg]["mlp"] else None
    if experts is not None:
        assert "expert" in str(experts.sharding.spec)
    ids, mask = _batch(config.vocab_size, seed=3)
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 x 14 tokens: 8 shards
    ref = hf_logits(model, ids, mask)
    out = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    real = mask.astype(bool)
    assert rel_err(out[real], ref[real]) < TOL


def test_converted_orbax_checkpoint_matches_hf(tmp_path, tmp_path_factory):
    """qwen2-convert hf-to-orbax of an HF-written MoE checkpoint, loaded back, equals HF."""
    from convert.cli import main as convert_main

    _, model, path = _build("k4-mlp-only", tmp_path_factory)
    dst = str(tmp_path / "orbax")
    assert convert_main(["hf-to-orbax", path, dst]) == 0
    config, params = qwen2_jax.load_checkpoint(dst)
    assert config.is_moe and config.mlp_only_layers == (0, 2)
    ids, mask = _batch(config.vocab_size, seed=4)
    ref = hf_logits(model, ids, mask)
    out = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    real = mask.astype(bool)
    assert rel_err(out[real], ref[real]) < TOL


def test_forward_selects_moe_impl_and_exchange(tmp_path_factory):
    """RunOptions(moe_impl=..., moe_exchange=...) reaches every sparse layer; all choices equal HF."""
    from qwen2_jax.sharding import make_mesh

    _, model, path = _build("k2", tmp_path_factory)
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask = _batch(config.vocab_size, seed=6)
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])
    ref = hf_logits(model, ids, mask)
    real = mask.astype(bool)
    for impl in ("ragged_dot", "tiled"):
        out = np.asarray(forward_outputs(config, params, ids, mask, options=RunOptions(moe_impl=impl))["logits"])
        assert rel_err(out[real], ref[real]) < TOL, impl
    _, sharded = qwen2_jax.load_checkpoint(path, mesh=make_mesh(data=2, expert=4))
    out = np.asarray(
        forward_outputs(config, sharded, ids, mask, options=RunOptions(moe_exchange="ragged_all_to_all"))["logits"]
    )
    assert rel_err(out[real], ref[real]) < TOL
    with pytest.raises(ValueError, match="unknown moe_impl 'fast'"):
        forward_outputs(config, params, ids, mask, options=RunOptions(moe_impl="fast"))
    with pytest.raises(ValueError, match="unknown moe_exchange"):
        forward_outputs(config, params, ids, mask, options=RunOptions(moe_exchange="nccl"))
