"""The SFT DataProvider (train/sft_data.py) in-process: what truncation did is counted, held-out rows are
kept only for evaluation, the stream's state refuses other packing, the vocabulary is checked, and a
checkpoint without a template gets the ChatML one it was trained with."""

import json

import numpy as np
import pytest

from qwen2_jax.tokenizer import load_tokenizer
from train.chat_render import ChatDataError
from train.config import load_config
from train.sft_data import ChatCorpus


def _conversation(i, words=5):
    answer = " ".join(f"word{i}" for _ in range(words))
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}


def _config(tmp_path, rows, *overrides):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"data.sources=[{data}]", f"data.cache_dir={tmp_path / 'cache'}", "seq_len=128", "task=sft", *overrides]
    return load_config(None, sets)


def test_truncation_is_counted_and_eval_rows_only_when_evaluating(tmp_path, tok_dir):
    rows = [_conversation(i) for i in range(10)] + [_conversation(99, words=200)]
    cut = ChatCorpus(_config(tmp_path, rows), str(tok_dir), 151936)
    assert (cut.stats.documents, cut.stats.cut, cut.stats.dropped) == (11, 1, 0)
    assert len(cut.eval_rows) == 0
    assert "1 cut, 0 dropped (data.truncation=cut)" in cut.summary(128, True, "cut")
    dropped = ChatCorpus(_config(tmp_path, rows, "data.truncation=drop", "eval_every=5"), str(tok_dir), 151936)
    assert (dropped.stats.cut, dropped.stats.dropped) == (0, 1)
    assert len(dropped.eval_rows) == 1 and len(dropped.train_rows) == dropped.stats.rows - 1
    batches = list(dropped.eval_iterator(global_batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 1 and batches[0]["segment_ids"][1:].max() == 0  # padding rows count nothing
    assert (batches[0]["labels"][1:] == -100).all()


def test_stream_state_names_the_packed_rows(tmp_path, tok_dir):
    rows = [_conversation(i) for i in range(12)]
    packed = ChatCorpus(_config(tmp_path, rows), str(tok_dir), 151936)
    unpacked = ChatCorpus(_config(tmp_path, rows, "data.packing=false"), str(tok_dir), 151936)
    it = packed.train_iterator(global_batch_size=2, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"input_ids", "labels", "segment_ids"} and batch["input_ids"].shape == (2, 128)
    assert batch["segment_ids"].max() > 1  # several conversations in a row
    state = it.get_state()
    other = unpacked.train_iterator(global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="num_sequences|data_sha256"):
        other.set_state(state)
    again = packed.train_iterator(global_batch_size=2, seed=0, process_index=0, process_count=1)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], next(it)["input_ids"])


def test_packed_rows_are_cached_until_an_input_changes(tmp_path, tok_dir):
    rows = [_conversation(i) for i in range(6)]
    first = ChatCorpus(_config(tmp_path, rows), str(tok_dir), 151936)
    again = ChatCorpus(_config(tmp_path, rows), str(tok_dir), 151936)
    assert not first.cached and again.cached and "read from the cache" in again.summary(128, True, "cut")
    np.testing.assert_array_equal(again.train_rows.labels, first.train_rows.labels)
    assert again.stats == first.stats
    assert not ChatCorpus(_config(tmp_path, rows, "loss.assistant_only=false"), str(tok_dir), 151936).cached
    changed = ChatCorpus(_config(tmp_path, rows + [_conversation(9)]), str(tok_dir), 151936)  # the file changed
    assert not changed.cached and changed.stats.documents == 7


def test_token_ids_past_the_vocabulary_exit_2(tmp_path, tok_dir):
    with pytest.raises(ChatDataError, match=r"makes token id \d+, past the model's vocab_size 1000"):
        ChatCorpus(_config(tmp_path, [_conversation(0)]), str(tok_dir), 1000)


def test_assets_carry_the_chatml_template_when_the_checkpoint_had_none(tmp_path, tok_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    corpus = ChatCorpus(_config(tmp_path, [_conversation(0)]), str(model_dir), 151936)
    assert corpus.renderer.template.is_fallback
    out = tmp_path / "checkpoints"
    out.mkdir()
    corpus.write_assets(str(out))
    messages = _conversation(0)["messages"]
    assert load_tokenizer(out).apply_chat_template(messages) == corpus.renderer.template.render(messages, True)
