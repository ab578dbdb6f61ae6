"""task dpo in-process: the loss and TRL's metrics equal a hand (numpy) DPO over per-sequence log-probs
taken from the model's own logits, with pairs packed several to a row; precomputed reference log-probs
give the step what the reference computes in it; rows are tokenized as TRL tokenizes them; truncation
cuts a pair at one length; bad rows name their file, line and field; `dpo.*` keys are checked.

TRL's DPOTrainer itself (loss, metrics, gradients) is tests/test_train_dpo_trl.py (slow); the command
line, checkpoints and resume are tests/test_train_dpo_cli.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax
from qwen2_jax.config import Qwen2Config
from qwen2_jax.tokenizer import load_tokenizer
from train.chat_render import ChatDataError, ChatRenderer
from train.config import ConfigKeyError, DpoConfig, LossConfig, load_config
from train.dpo_data import Pair, PairRenderer, fit_pairs, pack_pairs
from train.dpo_loss import count_pairs, dpo_terms, pair_logps
from train.dpo_objective import DpoObjective
from train.dpo_reference import FrozenModel, precompute_token_logps
from train.model_setup import ModelSetup, batch_sharding, build_mesh
from train.packing import IGNORE_INDEX
from train_utils import TINY_LOSS_MODEL

TINY = dict(TINY_LOSS_MODEL, vocab_size=97, max_position_embeddings=256, tie_word_embeddings=False)
SEQ_LEN = 64
TOLERANCE = 1e-5


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _hand_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """Per-pair loss and TRL's metrics from per-sequence log-probs, in float64 numpy."""
    x = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    loss = -(1 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x)
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return loss.mean(), {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
    }


def _random_pairs(vocab, count, seed=0):
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(0, vocab, rng.integers(lo, hi)).astype(np.int32)

    return [Pair(ids(2, 9), ids(1, 8), ids(1, 8)) for _ in range(count)]


def _randomized(params, seed):
    """Every leaf random (norm scales around 1), so no bug hides behind a zero bias or a unit norm."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        noise = jax.random.normal(k, x.shape, jnp.float32)
        is_norm = "norm" in jax.tree_util.keystr(path)
        out.append((1.0 + 0.3 * noise if is_norm else 0.3 * noise).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def model():
    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    setup = ModelSetup(Qwen2Config(**TINY), mesh)
    policy = _randomized(setup.init_params(0), 1)
    reference = _randomized(setup.init_params(0), 2)
    return setup, policy, reference


def _sequence_logps(setup, params, sequences, prompt_lens):
    """Per sequence, the sum of log p(completion tokens), from the model's full logits (float64). The
    sequences are right-padded into one batch: causal attention keeps padding out of the real tokens."""
    ids = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
    logits = np.asarray(qwen2_jax.forward(setup.config, params, ids), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    return np.array(
        [
            sum(logp[i, t - 1, seq[t]] for t in range(max(n, 1), len(seq)))
            for i, (seq, n) in enumerate(zip(sequences, prompt_lens))
        ]
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_packed_loss_and_metrics_equal_a_hand_dpo(model, label_smoothing):
    setup, policy, reference = model
    pairs = _random_pairs(TINY["vocab_size"], 7)
    rows, stats = pack_pairs(pairs, SEQ_LEN, packing=True, truncation="cut", pad_id=0)
    assert stats.rows < len(pairs) and stats.cut == stats.dropped == 0  # several pairs share a row
    dpo = DpoConfig(beta=0.3, label_smoothing=label_smoothing)
    objective = DpoObjective(setup, LossConfig(chunk_length=16), dpo, FrozenModel(setup, 16))
    batch = {k: jnp.asarray(v) for k, v in rows.items()}

    def loss(params):
        terms = objective.terms(params, batch, None, reference)
        pairs_in_batch = objective.normalizer(batch)
        return objective.combine(terms, pairs_in_batch, 1), objective.metrics(terms, pairs_in_batch, 1)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(policy)
    sums = {}
    for name, params in (("policy", policy), ("reference", reference)):
        sequences = [seq for p in pairs for seq in p.sequences()]  # chosen, rejected, chosen, ...
        logps = _sequence_logps(setup, params, sequences, [len(p.prompt) for p in pairs for _ in (0, 1)])
        sums[name] = [logps[0::2], logps[1::2]]
    want, want_metrics = _hand_dpo(*sums["policy"], *sums["reference"], 0.3, label_smoothing)
    assert float(metrics["pairs"]) == len(pairs)
    np.testing.assert_allclose(float(value), want, atol=TOLERANCE)
    for name, expected in want_metrics.items():
        np.testing.assert_allclose(
            float(metrics[name]), expected, atol=TOLERANCE * max(1.0, abs(expected)), err_msg=name
        )
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["lm_head"]).max()) > 0


def test_precomputed_reference_gives_the_step_what_the_reference_computes(model):
    setup, policy, reference = model
    rows, _ = pack_pairs(
        _random_pairs(TINY["vocab_size"], 9, seed=1), SEQ_LEN, packing=True, truncation="cut", pad_id=0
    )
    frozen_model = FrozenModel(setup, 16)
    sharding = batch_sharding(setup.mesh)
    fields = ("input_ids", "labels", "segment_ids")
    precomputed = precompute_token_logps(
        frozen_model, reference, rows, batch_size=2, batch_sharding=sharding, fields=fields
    )
    again = precompute_token_logps(frozen_model, reference, rows, batch_size=2, batch_sharding=sharding, fields=fields)
    np.testing.assert_array_equal(precomputed, again)  # what a resumed run reads
    assert np.all(precomputed[:, :-1][rows["labels"][:, 1:] == IGNORE_INDEX] == 0)  # only targets count
    objective = DpoObjective(setup, LossConfig(chunk_length=16), DpoConfig(), frozen_model)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    terms = jax.jit(objective.terms)
    live = terms(policy, batch, None, reference)
    stored = terms(policy, dict(batch, ref_logps=jnp.asarray(precomputed)), None, None)
    for name in live:
        np.testing.assert_allclose(float(stored[name]), float(live[name]), rtol=1e-6, atol=1e-6, err_msg=name)


def test_pair_sums_count_each_pair_once():
    seg = np.array([[1, 1, 2, 2, 2, 3, 3, 4, 4, 0], [1, 1, 1, 2, 2, 0, 0, 0, 0, 0]])
    values = np.arange(20, dtype=np.float32).reshape(2, 10)
    chosen, rejected, present = pair_logps(jnp.asarray(values), jnp.asarray(seg), 2)
    np.testing.assert_array_equal(np.asarray(present), [[True, True], [True, False]])
    np.testing.assert_array_equal(np.asarray(chosen), [[0 + 1, 5 + 6], [10 + 11 + 12, 0]])
    np.testing.assert_array_equal(np.asarray(rejected), [[2 + 3 + 4, 7 + 8], [13 + 14, 0]])
    assert float(count_pairs(jnp.asarray(seg))) == 3
    terms = dpo_terms(jnp.asarray(values), jnp.zeros_like(values), seg, beta=0.1, label_smoothing=0.0, pairs_per_row=2)
    assert float(terms["pairs"]) == 3


# ------------------------------------------------------------------------------------------ data
def test_truncation_cuts_a_pair_at_one_length_and_drops_what_has_nothing_left():
    prompt = np.arange(10, 16, dtype=np.int32)  # 6 tokens
    long = Pair(prompt, np.arange(20, 40, dtype=np.int32), np.arange(40, 44, dtype=np.int32))  # 26 + 10
    kept, cut, dropped = fit_pairs([long], 24, "cut")
    assert (cut, dropped) == (1, 0)
    chosen, _, rejected, _ = kept[0]
    assert (
        len(chosen) + len(rejected) == 24
        and len(rejected) == 10
        and list(chosen) == list(range(10, 16)) + list(range(20, 28))
    )
    assert fit_pairs([long], 24, "drop")[1:] == (0, 1)
    prompt_only = Pair(np.arange(10, 30, dtype=np.int32), np.array([1], np.int32), np.array([2], np.int32))
    assert fit_pairs([prompt_only], 24, "cut") == ([], 0, 1)  # the cut left no completion token
    rows, stats = pack_pairs([long, long], 36, packing=False, truncation="cut", pad_id=0)
    assert stats.rows == 2 and stats.cut == 0 and set(np.unique(rows["segment_ids"][0])) == {1, 2}
    assert rows["labels"][0, 6] == 20 and (rows["labels"][0, :6] == IGNORE_INDEX).all()


def test_rows_are_tokenized_as_trl_tokenizes_them(tok_dir):
    renderer = PairRenderer(ChatRenderer(load_tokenizer(tok_dir)))
    tok = renderer.tokenizer
    user = [{"role": "user", "content": "What does `json.dumps` do?"}]
    pair = renderer.pair(
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "Serialize obj."}],
            "rejected": [{"role": "assistant", "content": "Nothing."}],
        },
        "f:1",
    )
    assert tok.decode(pair.prompt.tolist()).endswith("<|im_start|>assistant\n")
    assert tok.decode(pair.chosen.tolist()) == "Serialize obj.<|im_end|>\n"  # the template's end of turn counts
    text = renderer.pair({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}, "f:2")
    assert tok.decode(text.chosen.tolist()) == " 4<|im_end|>" and tok.decode(text.prompt.tolist()) == "Q: 2+2?\nA:"


BAD_ROWS = [
    ({"prompt": "hi", "chosen": "a"}, "rejected: missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt: missing"),
    (
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": [], "rejected": []},
        "prompt[0].role: 'robot' is not a role the chat template knows",
    ),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "rejected: equals chosen"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "chosen: empty"),
    (
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": ""}],
            "rejected": [],
        },
        "chosen[0].content: an empty assistant turn",
    ),
    (
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}], "rejected": []},
        "chosen: no assistant turn (nothing to learn)",
    ),
    ({"prompt": "hi", "chosen": ["a"], "rejected": "b"}, "all strings or all message lists"),
]


@pytest.mark.parametrize("row,match", BAD_ROWS)
def test_bad_rows_name_their_field(tok_dir, row, match):
    renderer = PairRenderer(ChatRenderer(load_tokenizer(tok_dir)))
    with pytest.raises(ChatDataError, match="^data.jsonl:7: " + _escape(match)):
        renderer.pair(row, "data.jsonl:7")


def _escape(text):
    import re

    return ".*" + re.escape(text)


def test_dpo_keys_are_checked():
    config = load_config(None, ["task=dpo", "dpo.beta=0.5", "dpo.precompute_reference=true"])
    assert config.dpo == DpoConfig(beta=0.5, precompute_reference=True)
    with pytest.raises(ConfigKeyError, match="unknown config key 'dpo.betta'"):
        load_config(None, ["dpo.betta=0.5"])
    with pytest.raises(ConfigKeyError, match="'dpo.label_smoothing' must be in"):
        load_config(None, ["dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigKeyError, match="'dpo.beta' must be > 0"):
        load_config(None, ["dpo.beta=0"])


def test_rows_from_a_file_carry_file_and_line(tmp_path, tok_dir):
    from train.dpo_data import PreferenceCorpus

    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
    data.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " a"}) + "\n")
    config = load_config(None, ["task=dpo", f"data.sources=[{data}]", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ChatDataError, match=f"^{data}:3: rejected: equals chosen"):
        PreferenceCorpus(config, str(tok_dir), 151936)
