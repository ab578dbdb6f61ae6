"""Held-out preference accuracy: the share of pairs whose chosen answer the model finds likelier.

A pair counts as right when log πθ(chosen | prompt) > log πθ(rejected | prompt), each the sum of the
completion tokens' log-probabilities, as DPO scores them: the prompt is the user turn rendered with
the checkpoint's chat template and the generation prompt, the completion the assistant turn through
`<|im_end|>` and its newline. All sequences are padded to one length and scored in batches of one
shape, so a process compiles the scorer once for every checkpoint it scores.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

BATCH = 8
LENGTH_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Accuracy:
    right: int
    total: int
    mean_margin: float  # mean of log πθ(chosen) - log πθ(rejected), nats

    @property
    def value(self) -> float:
        return self.right / self.total

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.right}/{self.total} pairs; mean log-prob margin {self.mean_margin:+.2f} nats)"


def encode_completion(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """(prompt + completion ids, where the completion starts)."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(user, add_generation_prompt=True))
    full = tokenizer.encode(
        tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    )
    start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
    return full, start


def preference_accuracy(checkpoint: str, pairs: Sequence[tuple[str, str, str]]) -> Accuracy:
    """Accuracy of the checkpoint on (question, chosen, rejected) pairs."""
    import qwen2_jax
    from qwen2_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    config, params = qwen2_jax.load_checkpoint(checkpoint, dtype="float32")
    sequences = [encode_completion(tokenizer, q, answer) for q, c, r in pairs for answer in (c, r)]
    logps = completion_logps(config, params, sequences)
    chosen, rejected = logps[0::2], logps[1::2]
    return Accuracy(int(np.sum(chosen > rejected)), len(pairs), float(np.mean(chosen - rejected)))


def completion_logps(config, params, sequences: Sequence[tuple[list[int], int]]) -> np.ndarray:
    """Summed log-probability of each sequence's tokens from its completion start on."""
    import qwen2_jax

    longest = max(len(ids) for ids, _ in sequences)
    length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    count = -(-len(sequences) // BATCH) * BATCH  # whole batches: one compiled shape
    ids = np.zeros((count, length), np.int32)
    mask = np.zeros((count, length), np.int32)
    scored = np.zeros((count, length), np.float32)  # 1 where a token is a completion target
    for row, (tokens, start) in enumerate(sequences):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        scored[row, start : len(tokens)] = 1
    sums = []
    for at in range(0, count, BATCH):
        rows = slice(at, at + BATCH)
        logits = qwen2_jax.forward(config, params, ids[rows], mask[rows])
        sums.append(np.asarray(_target_logps_fn()(logits, ids[rows], scored[rows])))
    return np.concatenate(sums)[: len(sequences)]


@functools.cache
def _target_logps_fn():
    """The jitted scorer, built on first use (importing this module does not import jax)."""
    import jax
    import jax.numpy as jnp

    def target_logps(logits, ids, scored):
        # logits at position t predict the token at t + 1
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(picked * scored[:, 1:], axis=-1)

    return jax.jit(target_logps)
