"""task dpo against TRL's DPOTrainer (trl 1.16): the same tiny random HF Qwen2 as the policy (every
parameter random, biases and norms included, float32), another as the reference, the same pairs;
at step 0 our loss and TRL's four reward metrics (and logps/*) agree to 1e-5 and the gradients of
every parameter point the same way (cosine of the flattened gradients ~1, each parameter close).

Ours: the trainer's own objective on the rows of train/dpo_data.py (one pair per row, chosen and
rejected as two segments); TRL: `DPOTrainer.compute_loss` on its collated batch (chosen and rejected
as separate padded rows), then `backward`. Standard (text) and conversational (chat template) rows.

Slow (TRL's import and a model pair per case); the default suite checks the same loss path against a
hand DPO from the model's logits (tests/test_train_dpo.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_utils import save_tiny_chat_model
from qwen2_jax.hf_keys import hf_table
from train.config import load_config
from train.dpo_data import PreferenceCorpus
from train.dpo_run import dpo_objective
from train.model_setup import ModelSetup, build_mesh, resolve_model

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


CONVERSATIONAL = [
    {
        "prompt": _user("What does `json.dumps` do?"),
        "chosen": _assistant("Serialize obj to a JSON formatted str."),
        "rejected": _assistant("Remove any common leading whitespace from every line in text."),
    },
    {
        "prompt": [{"role": "system", "content": "Answer in one sentence."}, *_user("What does `shutil.copy2` do?")],
        "chosen": _assistant("Copy data and metadata."),
        "rejected": _assistant("Push item onto heap, maintaining the heap invariant."),
    },
    {
        "prompt": [*_user("Hi"), *_assistant("Hello."), *_user("What does `heapq.heappush` do?")],
        "chosen": _assistant("Push item onto heap, maintaining the heap invariant."),
        "rejected": _assistant("No."),
    },
]
STANDARD = [
    {"prompt": "Q: What does `os.path.join` do?\nA:", "chosen": " Join pathname components.", "rejected": " It sorts."},
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin, of course."},
    {"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    pass\n"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tok):
    base = tmp_path_factory.mktemp("dpo-trl")
    return str(base / "policy"), str(base / "reference"), base


def _trl(rows, policy_dir, reference_dir, hf_tok, base, beta):
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    policy = Qwen2ForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = Qwen2ForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(base / "trl"),
        beta=beta,
        per_device_train_batch_size=len(rows),
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default autocasts the reference to bfloat16, on CPU too
        logging_strategy="no",
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=hf_tok
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    grads = {name: p.grad.detach().numpy().copy() for name, p in trainer.model.named_parameters()}
    return float(loss.detach()), metrics, grads


def _ours(rows, policy_dir, reference_dir, base, beta):
    data = base / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = ["task=dpo", f"model={policy_dir}", f"dpo.reference={reference_dir}", f"dpo.beta={beta}", "seq_len=128"]
    sets += ["data.packing=false", f"data.sources=[{data}]", f"data.cache_dir={base / 'cache'}", "loss.chunk_length=32"]
    config = load_config(None, sets)
    source = resolve_model(config.model)
    corpus = PreferenceCorpus(config, policy_dir, source.config.vocab_size)
    setup = ModelSetup(source.config, build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1]))
    params, reference = setup.load_params(policy_dir), setup.load_params(reference_dir)
    objective, _ = dpo_objective(setup, config)
    batch = {k: jnp.asarray(v) for k, v in corpus.train_rows.items()}  # one pair per row, in file order

    def loss(params):
        terms = objective.terms(params, batch, None, reference)
        pairs = objective.normalizer(batch)
        return objective.combine(terms, pairs, 1), objective.metrics(terms, pairs, 1)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), {k: float(v) for k, v in metrics.items()}, grads, source.config


@pytest.mark.parametrize("rows", [CONVERSATIONAL, STANDARD], ids=["conversational", "standard"])
def test_loss_metrics_and_gradients_equal_trl(models, hf_tok, rows):
    policy_dir, reference_dir, base = models
    save_tiny_chat_model(policy_dir, hf_tok, tie_word_embeddings=False, seed=1, scale=0.3)
    save_tiny_chat_model(reference_dir, hf_tok, tie_word_embeddings=False, seed=2, scale=0.3)
    beta = 0.1
    trl_loss, trl_metrics, trl_grads = _trl(rows, policy_dir, reference_dir, hf_tok, base, beta)
    loss, metrics, grads, config = _ours(rows, policy_dir, reference_dir, base, beta)
    assert metrics["pairs"] == len(rows)
    diffs = {"loss": abs(loss - trl_loss)}
    diffs.update({name: abs(metrics[name] - trl_metrics[name]) for name in METRICS})
    print("max abs differences to TRL:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert diffs["loss"] <= TOLERANCE, (loss, trl_loss)
    for name in METRICS[:4]:
        assert diffs[name] <= TOLERANCE, (name, metrics[name], trl_metrics[name])
    for name in METRICS[4:]:  # sums of tens of token log-probs
        assert diffs[name] <= TOLERANCE * max(1.0, abs(trl_metrics[name])), (name, metrics[name], trl_metrics[name])
    assert 0 < trl_metrics["rewards/accuracies"] < 1 or abs(trl_metrics["rewards/margins"]) > 1e-3  # not trivial

    dot = ours_sq = theirs_sq = 0.0
    for entry in hf_table(config):
        leaf = grads
        for part in entry.path:
            leaf = leaf[part]
        ours = np.asarray(leaf, np.float64)[entry.index] if entry.index else np.asarray(leaf, np.float64)
        theirs = entry.to_param(trl_grads[entry.hf_key]).astype(np.float64)
        scale = max(np.abs(theirs).max(), 1e-12)
        assert np.abs(ours - theirs).max() <= 1e-4 * scale + 1e-7, entry.hf_key
        dot += float(np.sum(ours * theirs))
        ours_sq += float(np.sum(ours * ours))
        theirs_sq += float(np.sum(theirs * theirs))
    cosine = dot / np.sqrt(ours_sq * theirs_sq)
    print(f"gradient cosine {cosine:.9f}, norms {np.sqrt(ours_sq):.6f} (ours) {np.sqrt(theirs_sq):.6f} (TRL)")
    assert cosine > 1 - 1e-6
