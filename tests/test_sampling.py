"""Sampling: HF's logits processors exactly, the sampled distribution, validation, generation_config."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

import qwen2_jax
from hf_utils import hf_dense_config, hf_logits, make_hf_model
from qwen2_jax.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    load_generation_config,
    process_logits,
    select_tokens,
)


def _hf_process(logits, input_ids=None, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None):
    from transformers.generation import logits_process as lp

    scores = torch.tensor(logits)
    ids = torch.tensor(input_ids) if input_ids is not None else torch.zeros((scores.shape[0], 0), dtype=torch.long)
    if repetition_penalty is not None:
        scores = lp.RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    if temperature != 1.0:
        scores = lp.TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = lp.TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = lp.MinPLogitsWarper(min_p)(ids, scores)
    return scores.numpy()


def _ours_full(logits, sp: SamplingParams, seen=None):
    mode = sp.mode(logits.shape[-1])
    cand, ids = process_logits(jnp.asarray(logits), mode, sp.values(), None if seen is None else jnp.asarray(seen))
    cand = np.asarray(cand)
    if ids is None:
        return cand
    full = np.full(logits.shape, -np.inf, np.float32)
    np.put_along_axis(full, np.asarray(ids), cand, axis=1)
    return full


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=7),
        dict(temperature=1.3, top_p=0.6),
        dict(temperature=0.5, top_k=40, top_p=0.8),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.1),
        dict(temperature=1.0, top_k=1000),  # >= vocab: no-op, as HF clips it
    ],
)
def test_warpers_equal_hf(kwargs):
    rng = np.random.RandomState(0)
    logits = (rng.randn(6, 1000) * 3).astype(np.float32)
    ours = _ours_full(logits, SamplingParams(**kwargs))
    ref = _hf_process(logits, **kwargs)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours[finite], ref[finite])


def test_repetition_penalty_equals_hf():
    rng = np.random.RandomState(1)
    logits = (rng.randn(3, 50) * 2).astype(np.float32)
    input_ids = rng.randint(0, 50, (3, 12))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    for penalty in (1.3, 0.7):
        ref = _hf_process(logits, input_ids, repetition_penalty=penalty)
        ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty))
        np.testing.assert_array_equal(ours, ref)
        full = _ours_full(logits, SamplingParams(temperature=0.8, top_k=10, repetition_penalty=penalty), seen)
        ref = _hf_process(logits, input_ids, temperature=0.8, top_k=10, repetition_penalty=penalty)
        np.testing.assert_array_equal(np.isneginf(full), np.isneginf(ref))


def test_greedy_is_first_argmax():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    sp = SamplingParams()
    assert np.asarray(select_tokens(logits, sp.mode(4), sp.values())).tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        SamplingParams(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_hf_model(hf_dense_config(), seed=3)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    config, params = qwen2_jax.load_checkpoint(path)
    return model, config, params


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=40, top_p=0.9),
        pytest.param(dict(temperature=1.2, top_p=0.8, min_p=0.02), marks=pytest.mark.slow),
    ],
)
def test_first_token_distribution_matches_hf_softmax(tiny, kwargs):
    """Chi-square of 4096 first-token draws (one batched call) against softmax(HF processors(HF logits))."""
    model, config, params = tiny
    prompt = [5, 9, 2, 77, 31]
    draws = 4096
    rows = qwen2_jax.generate(config, params, [prompt] * draws, 1, seed=123, eos_token_ids=[], **kwargs)
    counts = np.bincount([r[0] for r in rows], minlength=config.vocab_size)
    ref = hf_logits(model, np.array([prompt]))[0, -1:]
    processed = _hf_process(ref, **kwargs)[0].astype(np.float64)
    probs = np.exp(processed - processed.max())
    probs /= probs.sum()
    assert counts[probs == 0].sum() == 0, "drew a token HF filters out"
    expected = probs * draws
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert len(obs) >= 3
    p_value = stats.chisquare(obs, exp).pvalue
    assert p_value > 1e-4, (kwargs, p_value)


def test_generation_config_defaults(tmp_path):
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 151643,
                "pad_token_id": 151643,
                "do_sample": True,
                "eos_token_id": [151645, 151643],
                "repetition_penalty": 1.05,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
            }
        )
    )
    assert load_generation_config(tmp_path) == dict(
        eos_token_ids=[151645, 151643], repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048})
    )
    assert load_generation_config(tmp_path) == dict(eos_token_ids=[151643], max_new_tokens=2048, temperature=0.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert load_generation_config(tmp_path) == dict(temperature=1.0, top_k=50, top_p=1.0)
