"""Dual Chunk Attention (qwen2_jax/dual_chunk.py) against a dense reference written here: explicit
query and key position matrices per the paper's formula (with vLLM's clamp to chunk_size), one masked
softmax, float64 numpy, on a tiny model with every parameter randomised. Prefill (uncached, and
generate's cached prefill), step-by-step decode from the KV cache, and the serving engine's chunked
prefill and decode all go through the blocked kernel with blocks smaller than a chunk, so blocks
inside one chunk relation and blocks straddling chunk boundaries both run."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model, rel_err
from qwen2_jax import cli, dual_chunk
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.forward import _forward, forward
from qwen2_jax.generate import generate_outputs
from qwen2_jax.hf_config import DualChunkSettings
from qwen2_jax.layers import rope_inv_freq
from qwen2_jax.options import RunOptions

DCA_REL = 1e-5
CHUNK, LOCAL = 16, 4  # chunks of 12 positions; query indices below 16
LENGTH = 4 * CHUNK


@pytest.fixture(autouse=True, scope="module")
def small_blocks():
    """Blocks of 8 queries x 8 keys: chunks of 12 positions make some blocks straddle a boundary."""
    saved = dual_chunk.BLOCK_Q, dual_chunk.BLOCK_K
    dual_chunk.BLOCK_Q, dual_chunk.BLOCK_K = 8, 8
    yield
    dual_chunk.BLOCK_Q, dual_chunk.BLOCK_K = saved


ROPES = {
    "default": dict(),
    "yarn": dict(
        rope_theta=1e6,
        max_position_embeddings=32,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(hf_dense_config(**ROPES[request.param]), seed=7)
    path = tmp_path_factory.mktemp(f"dca-{request.param}")
    model.save_pretrained(path)
    return str(path)


def _with_dca(config: Qwen2Config, original: int = 0) -> Qwen2Config:
    return config.replace(dual_chunk_attention=DualChunkSettings(CHUNK, LOCAL, original))


# ------------------------------------------------------------------------------------ reference
def reference_positions(dca: DualChunkSettings, length: int):
    """(P_q [i, j], P_k [j]) as the paper defines them: chunks of L = chunk_size - local_size;
    intra-chunk queries at i mod L, successive-chunk queries at min(i mod L + L, chunk_size), inter-chunk
    queries at min(2L - 1, chunk_size); keys at j mod L."""
    L, c = dca.chunk_len, dca.chunk_size
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    chunk_gap = i // L - j // L
    p_q = np.where(chunk_gap == 0, i % L, np.where(chunk_gap == 1, np.minimum(i % L + L, c), min(2 * L - 1, c)))
    return np.broadcast_to(p_q, (length, length)), np.arange(length) % L


def _rope(x, positions, inv_freq, attention_factor):
    """x [..., h] rotated at positions [...] (NeoX half split), float64."""
    angles = positions[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([angles, angles], axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * (np.cos(emb) * attention_factor) + rotated * (np.sin(emb) * attention_factor)


def reference_logits(config: Qwen2Config, params, ids):
    """Float64 logits [T, vocab] of one unpadded row under DCA: every (i, j) pair's query rotated at
    P_q[i, j] explicitly, one causal softmax per query."""
    dca = config.dual_chunk_attention
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layers = p["layers"]
    length, eps = len(ids), config.rms_norm_eps
    inv_freq, attention_factor = rope_inv_freq(config)
    inv_freq = np.asarray(inv_freq, np.float64)
    p_q, p_k = reference_positions(dca, length)
    scale = np.full(length, config.head_size**-0.5)
    if dca.original_max_position_embeddings:
        s = np.maximum(0.1 * np.log(np.arange(1, length + 1) / dca.original_max_position_embeddings) + 1, 1)
        scale = scale * s * s
    causal = np.tril(np.ones((length, length), bool))
    group = config.num_attention_heads // config.num_key_value_heads

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    x = p["embed_tokens"][np.asarray(ids)]
    for li in range(config.num_hidden_layers):
        a = {name: w[li] for name, w in layers["self_attn"].items()}
        m = {name: w[li] for name, w in layers["mlp"].items()}
        h = rms(x, layers["input_layernorm"]["scale"][li])
        q = np.einsum("td,dnh->tnh", h, a["q_kernel"]) + a["q_bias"]
        k = np.einsum("td,dkh->tkh", h, a["k_kernel"]) + a["k_bias"]
        v = np.einsum("td,dkh->tkh", h, a["v_kernel"]) + a["v_bias"]
        k = np.repeat(_rope(k, p_k[:, None], inv_freq, attention_factor), group, axis=1)
        v = np.repeat(v, group, axis=1)
        q_ij = _rope(np.broadcast_to(q[:, None], (length, length) + q.shape[1:]), p_q[..., None], inv_freq, 1.0)
        q_ij = q_ij * attention_factor
        scores = np.einsum("ijnh,jnh->nij", q_ij, k) * scale[None, :, None]
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("nij,jnh,nhd->id", probs, v, a["o_kernel"])
        h = rms(x, layers["post_attention_layernorm"]["scale"][li])
        gate, up = h @ m["gate_kernel"], h @ m["up_kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down_kernel"]
    head = p["embed_tokens"].T if config.tie_word_embeddings else p["lm_head"]
    return rms(x, p["norm"]["scale"]) @ head


# ----------------------------------------------------------------------------------------- tests
def test_reference_positions_are_ordinary_inside_one_chunk():
    """The reference's own check: below chunk_size, P_q - P_k is i - j (what makes (a) exact)."""
    p_q, p_k = reference_positions(DualChunkSettings(CHUNK, LOCAL), CHUNK)
    i, j = np.indices((CHUNK, CHUNK))
    np.testing.assert_array_equal((p_q - p_k[None])[j <= i], (i - j)[j <= i])


def test_shorter_than_chunk_size_is_ordinary_attention_exactly(checkpoint):
    config, params = qwen2_jax.load_checkpoint(checkpoint)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, CHUNK))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    plain = np.asarray(forward(config, params, ids, mask))
    np.testing.assert_array_equal(
        np.asarray(qwen2_jax.forward_outputs(_with_dca(config), params, ids, mask)["logits"]), plain
    )
    # the same program, not only the same numbers
    options = RunOptions().for_params(params, None)

    def lowered(cfg):
        return _forward.lower(
            params, ids, mask, config=cfg, options=options, output_hidden_states=False, output_router_logits=False
        ).as_text()

    assert lowered(_with_dca(config)) == lowered(config)


@pytest.mark.parametrize("original", [0, 24])
def test_prefill_equals_dense_reference(checkpoint, original):
    """4 x chunk_size, a full row and a left-padded one; original_max_position_embeddings 24 scales
    the logits of queries past position 24."""
    config, params = qwen2_jax.load_checkpoint(checkpoint)
    config = _with_dca(config, original)
    rng = np.random.RandomState(1)
    ids = rng.randint(0, config.vocab_size, (2, LENGTH))
    mask = np.ones_like(ids)
    mask[1, :11] = 0
    ours = np.asarray(forward(config, params, ids, mask))
    for row in range(2):
        real = mask[row].astype(bool)
        ref = reference_logits(config, params, ids[row, real])
        assert rel_err(ours[row, real], ref) < DCA_REL, row
    # DCA is on: the same model without it gives other logits past one chunk
    assert rel_err(np.asarray(forward(config.replace(dual_chunk_attention=None), params, ids[:1]))[0], ours[0]) > 1e-3


def test_decode_from_the_cache_equals_dense_reference(checkpoint):
    """generate: a cached prefill of 3 x chunk_size (and a shorter left-padded prompt), then a chunk
    of tokens decoded one at a time; every step's logits against the reference over prompt + tokens."""
    config, params = qwen2_jax.load_checkpoint(checkpoint)
    config = _with_dca(config, original=40)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, config.vocab_size, 3 * CHUNK).tolist(), rng.randint(0, config.vocab_size, 29).tolist()]
    out = generate_outputs(config, params, prompts, CHUNK, eos_token_ids=[], output_logits=True)
    for prompt, tokens, logits in zip(prompts, out["tokens"], out["logits"]):
        ref = reference_logits(config, params, prompt + tokens[:-1])[len(prompt) - 1 :]
        assert rel_err(logits, ref) < DCA_REL
        assert tokens == np.argmax(ref, axis=-1).tolist()


def test_serving_engine_chunked_prefill_and_decode_equal_dense_reference(tmp_path):
    """qwen2-serve's engine: a prompt prefilled 16 tokens at a time, then decode steps at per-row
    cache indices, attending to cache prefixes long enough to need DCA."""
    from serve.engine import Engine

    path = tmp_path / "ckpt"
    make_hf_model(hf_dense_config(), seed=5).save_pretrained(path)
    config, params = qwen2_jax.load_checkpoint(str(path))
    config = _with_dca(config)
    engine = Engine(config, params, max_batch_size=2, max_model_len=LENGTH, max_prefill_chunk=16, kv_bucket_min=16)
    prompt = np.random.RandomState(3).randint(0, config.vocab_size, 3 * CHUNK - 5).tolist()
    body = prompt[:-1]  # the last prompt token is the first decode input
    for start in range(0, len(body), 16):
        engine.prefill(1, body[start : start + 16], start)
    rows = engine.empty_rows()
    rows.active[1], rows.logprobs[1] = True, True
    rows.feed[1], rows.length[1] = prompt[-1], len(body)
    tokens = []
    for _ in range(8):
        result = engine.decode(rows)
        tokens.append(int(result["tokens"][1]))
        ref = reference_logits(config, params, prompt + tokens[:-1])[-1]
        ref_logprobs = ref - np.logaddexp.reduce(ref)
        assert tokens[-1] == int(np.argmax(ref))
        assert abs(result["logprob"][1] - ref_logprobs[tokens[-1]]) < DCA_REL * np.abs(ref_logprobs).max()
        rows.feed[1], rows.length[1] = tokens[-1], rows.length[1] + 1


# --------------------------------------------------------------------------- config and flags
def test_hf_config_with_dual_chunk_attention_loads_with_it_on(tmp_path):
    make_hf_model(hf_dense_config(), seed=3).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    hf["dual_chunk_attention_config"] = {
        "chunk_size": CHUNK,
        "local_size": LOCAL,
        "original_max_position_embeddings": 24,
        "sparse_attention_enabled": False,  # vLLM's sparse keys are read and ignored
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config, params = qwen2_jax.load_checkpoint(str(tmp_path))
    assert config.dual_chunk_attention == DualChunkSettings(CHUNK, LOCAL, 24)
    assert config.context_length is None
    assert Qwen2Config.from_hf(config.to_hf()) == config
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (1, 2 * CHUNK))
    ref = reference_logits(config, params, ids[0])
    assert rel_err(np.asarray(forward(config, params, ids))[0], ref) < DCA_REL


@pytest.mark.parametrize(
    "change, match",
    [
        ({"dual_chunk_attention_config": {"chunk_size": 8, "local_size": 8}}, "local_size"),
        ({"dual_chunk_attention_config": {"chunk_size": 8, "local": 2}}, "unknown"),
        ({"dual_chunk_attention_config": {"chunk_size": -8, "local_size": 2}}, "chunk_size"),
        ({"dual_chunk_attention_config": [8, 2]}, "must be an object"),
        (
            {
                "dual_chunk_attention_config": {},
                "use_sliding_window": True,
                "sliding_window": 4,
                "max_window_layers": 0,
            },
            "sliding",
        ),
        ({"dual_chunk_attention_config": {}, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ],
)
def test_bad_dual_chunk_configs_are_refused(change, match):
    hf = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, **change}
    with pytest.raises(ConfigError, match=match):
        Qwen2Config.from_hf(hf)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dca-cli")
    make_hf_model(hf_dense_config(max_position_embeddings=40), seed=9).save_pretrained(path)
    return str(path)


def test_generate_flag_turns_dca_on_past_the_context(cli_checkpoint, capsys):
    """--dual-chunk-attention 16,4: a prompt past max_position_embeddings (40) runs, as DCA's API does."""
    config, params = qwen2_jax.load_checkpoint(cli_checkpoint)
    prompt = np.random.RandomState(6).randint(0, config.vocab_size, 50).tolist()
    argv = ["--checkpoint", cli_checkpoint, "--prompt-ids", ",".join(map(str, prompt)), "--json"]
    rc = cli.main(argv + ["--max-new-tokens", "6", "--temperature", "0", "--dual-chunk-attention", f"{CHUNK},{LOCAL}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    expected = qwen2_jax.generate(_with_dca(config), params, [prompt], 6, eos_token_ids=[])[0]
    assert json.loads(out)["tokens"] == expected
    assert cli.main(argv) == 2  # without the flag the prompt is past the context
    assert "context" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["16", "16,16", "4,16", "a,b", "16,4,2", "16,-1"])
def test_bad_flag_values_exit_2_with_one_line(cli_checkpoint, capsys, value):
    from serve import cli as serve_cli

    for main in (cli.main, serve_cli.main):
        prompt = ["--prompt-ids", "1"] if main is cli.main else []
        rc = main(["--checkpoint", cli_checkpoint, *prompt, "--dual-chunk-attention", value])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.count("\n") == 1 and "--dual-chunk-attention" in err and "Traceback" not in err


def test_flag_on_a_config_that_cannot_take_dca_exits_2(tmp_path, capsys):
    hf_dense_config(use_sliding_window=True, sliding_window=4, max_window_layers=0).save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "config.json")
    rc = cli.main(["--checkpoint", str(tmp_path), "--prompt-ids", "1", "--dual-chunk-attention", "16,4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "sliding" in err
