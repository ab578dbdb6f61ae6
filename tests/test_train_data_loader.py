"""Training data, reading: the memory-mapped grain source, the training stream (determinism, process
sharding, exact and elastic resume) and the held-out batches."""

from __future__ import annotations

import json
import pickle

import grain
import numpy as np
import pytest

from train.data import (
    PackedTokenSource,
    make_eval_iterator,
    make_train_iterator,
)
from train_data_utils import EOS, SEQ_LEN, take

# ---------------------------------------------------------------------------------------------
# Reading: the data source


def test_source_is_a_memory_mapped_grain_data_source(prepared):
    source = PackedTokenSource(prepared, "train")
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert all(isinstance(shard, np.memmap) for shard in source.shards)
    row = source[len(source) - 1]
    assert type(row) is np.ndarray and row.dtype == np.int32 and row.shape == (SEQ_LEN,)
    np.testing.assert_array_equal(row, source.shards[-1][-1])
    with pytest.raises(IndexError):
        source[len(source)]
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[3], source[3])


def test_missing_shard_is_named(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / "train-00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard missing: .*train-00001.npy"):
        PackedTokenSource(copy)


# ---------------------------------------------------------------------------------------------
# Reading: the training stream


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    a = take(make_train_iterator(prepared, global_batch_size=4, seed=3, process_index=0, process_count=1), 5)
    b = take(make_train_iterator(prepared, global_batch_size=4, seed=3, process_index=0, process_count=1), 5)
    c = take(make_train_iterator(prepared, global_batch_size=4, seed=4, process_index=0, process_count=1), 5)
    assert all(x.shape == (4, SEQ_LEN) and x.dtype == np.int32 for x in a)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_every_epoch_is_a_new_permutation_of_all_rows(prepared):
    source = PackedTokenSource(prepared)
    rows = {tuple(source[i]) for i in range(len(source))}
    n = len(source)
    iterator = make_train_iterator(prepared, global_batch_size=1, seed=0, process_index=0, process_count=1)
    epochs = [[tuple(next(iterator)["input_ids"][0]) for _ in range(n)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(rows) and len(set(epochs[0])) == n
    assert epochs[0] != epochs[1]
    assert iterator.epoch == 2.0


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_local_batches_concatenate_to_the_global_batch(prepared, process_count):
    whole = take(make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=0, process_count=1), 12)
    parts = [
        take(
            make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=p, process_count=process_count), 12
        )
        for p in range(process_count)
    ]
    for step in range(12):
        assert parts[0][step].shape == (8 // process_count, SEQ_LEN)
        np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), whole[step])


@pytest.mark.parametrize("where", ["mid-epoch", "next-epoch"])
def test_exact_resume_from_saved_state(prepared, where):
    n = len(PackedTokenSource(prepared))
    steps_before = 3 if where == "mid-epoch" else n // 8 + 1
    assert (steps_before * 8 < n) == (where == "mid-epoch")
    unbroken = take(
        make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1), steps_before + 6
    )
    first = make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1)
    take(first, steps_before)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_sample"] == steps_before * 8
    resumed = make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1, state=state)
    np.testing.assert_array_equal(np.stack(take(resumed, 6)), np.stack(unbroken[steps_before:]))
    # set_state also rewinds an iterator that has run ahead
    take(first, 4)
    first.set_state(state)
    np.testing.assert_array_equal(np.stack(take(first, 6)), np.stack(unbroken[steps_before:]))


def test_elastic_resume_with_another_process_count_and_batch_size(prepared):
    unbroken = np.concatenate(
        take(make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=0, process_count=1), 20)
    )
    two = [
        make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=p, process_count=2) for p in range(2)
    ]
    for iterator in two:
        take(iterator, 5)
    states = [iterator.get_state() for iterator in two]
    assert states[0] == states[1]  # one state for all processes

    one = make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=0, process_count=1, state=states[0])
    np.testing.assert_array_equal(np.concatenate(take(one, 4)), unbroken[40:72])
    # 4 processes with a global batch of 12 continue from the same global sample
    four = [
        make_train_iterator(prepared, global_batch_size=12, seed=2, process_index=p, process_count=4, state=states[0])
        for p in range(4)
    ]
    steps = [take(iterator, 3) for iterator in four]
    glued = np.concatenate([np.concatenate([steps[p][k] for p in range(4)]) for k in range(3)])
    np.testing.assert_array_equal(glued, unbroken[40:76])


def test_state_of_another_run_is_refused(prepared):
    state = make_train_iterator(prepared, global_batch_size=4, seed=1, process_index=0, process_count=1).get_state()
    other = make_train_iterator(prepared, global_batch_size=4, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed 1, this run has 2"):
        other.set_state(state)
    with pytest.raises(ValueError, match="data_sha256"):
        other.set_state({**state, "seed": 2, "data_sha256": "0" * 64})


def test_global_batch_must_divide_among_processes(prepared):
    with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by process_count 4"):
        make_train_iterator(prepared, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index 2 is not in range for process_count 2"):
        make_train_iterator(prepared, global_batch_size=4, seed=0, process_index=2, process_count=2)


def test_default_process_layout_comes_from_jax(prepared):
    iterator = make_train_iterator(prepared, global_batch_size=2, seed=0)
    assert (iterator.process_index, iterator.process_count, iterator.local_batch_size) == (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# Reading: held-out batches


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_the_held_out_rows_once_in_order(prepared, process_count):
    held_out = PackedTokenSource(prepared, "eval")
    assert len(held_out) == 5
    per_process = [
        list(make_eval_iterator(prepared, global_batch_size=4, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert all(len(batches) == 2 for batches in per_process)  # ceil(5 / 4) on every process
    ids = np.concatenate([np.concatenate([b[k]["input_ids"] for b in per_process]) for k in range(2)])
    mask = np.concatenate([np.concatenate([b[k]["attention_mask"] for b in per_process]) for k in range(2)])
    np.testing.assert_array_equal(ids[:5], [held_out[i] for i in range(5)])
    assert mask[:5].all() and not mask[5:].any() and (ids[5:] == EOS).all()


def test_eval_batches_are_reiterable(prepared):
    batches = make_eval_iterator(prepared, global_batch_size=2, process_index=0, process_count=1)
    first, second = list(batches), list(batches)
    assert len(batches) == len(first) == 3
    np.testing.assert_array_equal(np.stack([b["input_ids"] for b in first]), np.stack([b["input_ids"] for b in second]))
