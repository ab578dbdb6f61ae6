"""Generation: cached decode == uncached forward, greedy == HF argmax (teacher-forced), batching,
stop tokens, prompt buckets, streaming, argument checking."""

import numpy as np
import pytest
import torch

import qwen2_jax
from hf_utils import hf_dense_config, hf_logits, make_hf_model, rel_err
from qwen2_jax.forward import forward
from qwen2_jax.generate import GenerateOptions, Generator, bucket, generate_outputs, generate_stream
from tolerances import ARGMAX_REL, CACHE_REL, PARITY_REL

TOL = PARITY_REL  # against HF; cached vs uncached uses CACHE_REL (tests/tolerances.py)
# Lengths 5, 1, 16, 3: one prompt bucket (16) and one batch bucket (4) for most tests, so the
# programs compile once and are shared between tests.
PROMPTS = [[3, 17, 99, 42, 8], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], [64, 1, 2]]
TOPK = dict(temperature=1.0, top_k=20)
CASES = {
    "dense": dict(),
    # Sliding window narrower than the generated sequence: the window must slide during decode.
    "sliding": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True),
}


def _load(name, tmp_path_factory):
    model = make_hf_model(hf_dense_config(**CASES[name]), seed=7)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    config, params = qwen2_jax.load_checkpoint(path)
    return name, model, str(path), config, params


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return _load("dense", tmp_path_factory)


@pytest.fixture(scope="module")
def sliding_case(tmp_path_factory):
    return _load("sliding", tmp_path_factory)


def _teacher_forced_check(model, prompt, tokens, logits=None):
    """Every generated token is an argmax of HF's logits for prompt + the tokens before it."""
    ref = hf_logits(model, np.array([prompt + tokens]))[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    for step, tok in enumerate(tokens):
        row = ref[step]
        scale = max(1.0, float(np.max(np.abs(row))))
        assert row[tok] >= row.max() - ARGMAX_REL * scale, f"step {step}: token {tok} is not HF's argmax {row.argmax()}"
    if logits is not None:
        assert rel_err(logits, ref) < TOL


@pytest.mark.parametrize(
    "which, layer_layout", [("dense", "per_layer"), ("dense", "stacked"), ("sliding", "per_layer")]
)
def test_cached_decode_equals_uncached_forward_and_hf_argmax(which, layer_layout, request):
    name, model, _, config, params = request.getfixturevalue("case" if which == "dense" else "sliding_case")
    new = 14
    out = generate_outputs(
        config, params, PROMPTS, new, eos_token_ids=[], output_logits=True, layer_layout=layer_layout
    )
    # One uncached forward over every prompt + its tokens (right-padded).
    width = max(len(p) for p in PROMPTS) + new
    ids = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, t) in enumerate(zip(PROMPTS, out["tokens"])):
        ids[i, : len(p) + len(t)] = p + t
        mask[i, : len(p) + len(t)] = 1
    full = np.asarray(forward(config, params, ids, mask))
    for i, (prompt, tokens, logits) in enumerate(zip(PROMPTS, out["tokens"], out["logits"])):
        assert len(tokens) == new
        uncached = full[i, len(prompt) - 1 : len(prompt) - 1 + new]
        assert rel_err(logits, uncached) < CACHE_REL, (name, layer_layout)
        assert (np.argmax(logits, -1) == np.array(tokens)).all()
        _teacher_forced_check(model, prompt, tokens, logits)


def test_batched_equals_one_by_one(case):
    _, _, _, config, params = case
    batched = qwen2_jax.generate(config, params, PROMPTS, 9, eos_token_ids=[])
    single = [qwen2_jax.generate(config, params, [p], 9, eos_token_ids=[])[0] for p in PROMPTS]
    assert batched == single
    # Row 0 of a sampled batch draws with the same keys as a batch of one.
    sampled = qwen2_jax.generate(config, params, PROMPTS, 9, seed=5, eos_token_ids=[], **TOPK)
    assert sampled[0] == qwen2_jax.generate(config, params, PROMPTS[:1], 9, seed=5, eos_token_ids=[], **TOPK)[0]


def test_stop_tokens_end_rows_independently(case):
    _, _, _, config, params = case
    free = qwen2_jax.generate(config, params, PROMPTS, 12, eos_token_ids=[])
    stop = free[0][3]
    stopped = qwen2_jax.generate(config, params, PROMPTS, 12, eos_token_ids=[stop])
    for row, full in zip(stopped, free):
        expect = full[: full.index(stop) + 1] if stop in full else full
        assert row == expect
    assert stopped[0][-1] == stop and len(stopped[0]) <= 4
    assert any(len(r) == 12 for r in stopped) or all(stop in r for r in free)
    # Several stop ids; the config's eos_token_id is the default.
    two = [free[0][2], free[1][5]]
    rows = qwen2_jax.generate(config, params, PROMPTS, 12, eos_token_ids=two)
    for row, full in zip(rows, free):
        cut = min([full.index(t) for t in two if t in full], default=len(full) - 1)
        assert row == full[: cut + 1]
    with_default = qwen2_jax.generate(config.with_checkpoint_info(eos_token_id=stop), params, PROMPTS, 12)
    assert with_default == stopped


def test_stream_equals_generate(case):
    _, _, _, config, params = case
    for kwargs in (dict(seed=3, **TOPK),):
        free = qwen2_jax.generate(config, params, PROMPTS, 10, eos_token_ids=[], **kwargs)
        stop = free[1][4]
        expect = qwen2_jax.generate(config, params, PROMPTS, 10, eos_token_ids=[stop], **kwargs)
        for chunk in (1, 4):
            rows = [[] for _ in PROMPTS]
            for column in generate_stream(
                config, params, PROMPTS, 10, eos_token_ids=[stop], chunk_size=chunk, **kwargs
            ):
                assert len(column) == len(PROMPTS)
                for r, t in zip(rows, column):
                    if t is not None:
                        r.append(t)
            assert rows == expect


def test_prompt_buckets_limit_compilations(case):
    _, _, _, config, params = case
    assert [bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 100)] == [16, 16, 24, 24, 32, 48, 64, 128]
    generator = Generator(config, params)
    generator.generate([[1, 2]], GenerateOptions(3, top_k=10, temperature=0.5, seed=1))
    assert generator.trace_counts["generate"] == 1
    for n, new, temp, k in ((3, 5, 0.7, 5), (9, 2, 1.3, 20), (16, 16, 0.9, 31), (1, 11, 0.5, 1)):
        generator.generate([list(range(1, n + 1))], GenerateOptions(new, temperature=temp, top_k=k, seed=n))
    assert generator.trace_counts["generate"] == 1  # one bucket: no new compilation
    generator.generate([list(range(1, 18))], GenerateOptions(3))
    assert generator.trace_counts["generate"] == 2  # prompt bucket 24
    # The function form finds the generator made for the same params: no compilation either.
    other = Generator(config, params)
    assert other.trace_counts["generate"] == 0  # a second generator owns its own programs
    assert qwen2_jax.generate(config, generator, [[1, 2]], 3) == generator.generate([[1, 2]], GenerateOptions(3))


def test_seeds_reproduce(case):
    _, _, _, config, params = case
    kw = dict(eos_token_ids=[], **TOPK)
    a = qwen2_jax.generate(config, params, PROMPTS, 8, seed=11, **kw)
    assert a == qwen2_jax.generate(config, params, PROMPTS, 8, seed=11, **kw)
    assert a != qwen2_jax.generate(config, params, PROMPTS, 8, seed=12, **kw)


def test_generator_layouts_and_max_new_tokens(case):
    _, _, _, config, params = case
    expect = qwen2_jax.generate(config, params, PROMPTS, 6, eos_token_ids=[])
    transposed = Generator(config, params)
    assert transposed.options.kernel_layout == "out_in" and "layer_0" in transposed.params
    assert transposed.generate(PROMPTS, GenerateOptions(6, eos_token_ids=[])) == expect
    module_layout = Generator(config, params, kernel_layout="in_out")
    assert qwen2_jax.generate(config, module_layout, PROMPTS, 6, eos_token_ids=[]) == expect
    assert qwen2_jax.generate(config, params, PROMPTS, 0) == [[], [], [], []]
    assert [r[:3] for r in expect] == qwen2_jax.generate(config, params, PROMPTS, 3, eos_token_ids=[])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 500]]), "outside the vocabulary"),
        (dict(prompts=[[1] * 257]), "context"),
        (dict(layer_layout="nope"), "layer_layout"),
    ],
)
def test_invalid_arguments_raise(case, kwargs, match):
    _, _, _, config, params = case
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        qwen2_jax.generate(config, params, **args)


def test_sharded_generation_equals_single_device(case):
    import jax

    from qwen2_jax.sharding import make_mesh

    _, _, path, config, params = case
    expect = qwen2_jax.generate(config, params, PROMPTS, 8, eos_token_ids=[])
    mesh = make_mesh(fsdp=4, tensor=2, devices=jax.devices()[:8])
    _, sharded = qwen2_jax.load_checkpoint(path, mesh=mesh)
    assert qwen2_jax.generate(config, sharded, PROMPTS, 8, eos_token_ids=[]) == expect


@pytest.mark.slow
def test_sharded_scan_generation_equals_single_device(case):
    import jax

    from qwen2_jax.sharding import make_mesh

    _, _, path, config, params = case
    expect = qwen2_jax.generate(config, params, PROMPTS, 8, eos_token_ids=[])
    _, sharded = qwen2_jax.load_checkpoint(path, mesh=make_mesh(fsdp=4, tensor=2, devices=jax.devices()[:8]))
    assert qwen2_jax.generate(config, sharded, PROMPTS, 8, eos_token_ids=[], layer_layout="stacked") == expect


def test_greedy_with_repetition_penalty_matches_hf(case):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    _, model, _, config, params = case
    prompt = PROMPTS[0]
    tokens = qwen2_jax.generate(config, params, [prompt], 10, repetition_penalty=1.7, eos_token_ids=[])[0]
    seq = prompt + tokens
    ref = hf_logits(model, np.array([seq]))[0]
    proc = RepetitionPenaltyLogitsProcessor(1.7)
    for step, tok in enumerate(tokens):
        i = len(prompt) + step
        scores = proc(torch.tensor([seq[:i]]), torch.tensor(ref[i - 1][None])).numpy()[0]
        assert scores[tok] >= scores.max() - ARGMAX_REL * max(1.0, np.abs(scores).max())


@pytest.mark.parametrize("layer_layout", ["per_layer", "stacked"])
def test_long_prompts_decode_equals_uncached_forward(layer_layout, sliding_case):
    """Prompts longer than attention's causal query blocks: the blocked prefill feeds the same cache."""
    _, model, _, config, params = sliding_case
    rng = np.random.RandomState(9)
    prompts = [rng.randint(0, config.vocab_size, 130).tolist(), rng.randint(0, config.vocab_size, 70).tolist()]
    new = 5
    out = generate_outputs(
        config, params, prompts, new, eos_token_ids=[], output_logits=True, layer_layout=layer_layout
    )
    for prompt, tokens, logits in zip(prompts, out["tokens"], out["logits"]):
        full = np.asarray(forward(config, params, np.array([prompt + tokens])))[0]
        assert rel_err(logits, full[len(prompt) - 1 : len(prompt) - 1 + new]) < CACHE_REL
        _teacher_forced_check(model, prompt, tokens)


def test_requests_past_the_context_are_refused_unless_allowed(case):
    _, _, _, config, params = case  # max_position_embeddings 256
    with pytest.raises(ValueError, match=r"5 tokens \+ max_new_tokens 252 .* context of 256"):
        qwen2_jax.generate(config, params, [[1, 2, 3, 4, 5]], 252)
    assert len(qwen2_jax.generate(config, params, [[1, 2, 3, 4, 5]], 251, eos_token_ids=[])[0]) == 251
    rows = qwen2_jax.generate(config, params, [[1, 2, 3, 4, 5]], 254, eos_token_ids=[], allow_context_overflow=True)
    assert len(rows[0]) == 254


def test_function_form_reuses_and_releases_generators():
    """The function form keeps a generator only while the caller's params are alive."""
    import gc
    import importlib

    import jax

    from qwen2_jax.params import init_params

    generate_module = importlib.import_module("qwen2_jax.generate")  # the package exports a function of that name

    config = qwen2_jax.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    params = init_params(config, jax.random.key(0))
    first = generate_module.generator_for(config, params)
    assert generate_module.generator_for(config, params) is first
    assert generate_module.generator_for(config, dict(params)) is first  # same arrays, another dict
    held = len(generate_module._GENERATORS)
    del params, first
    gc.collect()
    assert len(generate_module._GENERATORS) == held - 1
