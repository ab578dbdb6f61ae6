"""A stand-in for the data pipeline in unit tests: deterministic, learnable token rows with the
iterator protocol the trainer uses (next, get_state, set_state)."""

from __future__ import annotations

import numpy as np


class _Rows:
    def __init__(self, vocab, seq_len, global_batch_size, seed, process_index, process_count, split_offset=0):
        self.vocab, self.seq_len = vocab, seq_len
        self.global_batch_size, self.seed = global_batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.split_offset = split_offset
        self.index = 0

    def row(self, i):
        # an arithmetic progression mod vocab with a per-row start and stride: learnable next tokens
        rng = np.random.default_rng([self.seed, self.split_offset, i])
        start, stride = rng.integers(0, self.vocab), rng.integers(1, 4)
        return (start + stride * np.arange(self.seq_len)) % self.vocab

    def __iter__(self):
        return self

    def __next__(self):
        local = self.global_batch_size // self.process_count
        first = self.index * self.global_batch_size + self.process_index * local
        self.index += 1
        return {"input_ids": np.stack([self.row(first + r) for r in range(local)]).astype(np.int32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class SyntheticData:
    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def train_iterator(self, *, global_batch_size, seed, process_index, process_count):
        return _Rows(self.vocab, self.seq_len, global_batch_size, seed, process_index, process_count)

    def eval_iterator(self, *, global_batch_size, process_index, process_count):
        return _Rows(self.vocab, self.seq_len, global_batch_size, 12345, process_index, process_count, 1)


# The tiny dense Qwen2 of the loss, packing, DPO and sequence-parallel tests (each sets its context length,
# tying, or vocabulary where it needs another)
TINY_LOSS_MODEL = dict(
    model_type="qwen2",
    vocab_size=160,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

TINY_MODEL = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
