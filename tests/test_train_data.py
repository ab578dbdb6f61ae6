"""Training data: preparing packed token shards with the real Qwen2 tokenizer, and reading them back
(determinism, process sharding, exact and elastic resume, held-out batches, errors, CLI)."""

from __future__ import annotations

import json
import pickle
import random
import sysconfig
from pathlib import Path

import grain
import numpy as np
import pytest
from tokenizers import Tokenizer

from qwen2_jax.tokenizer_build import write_qwen2_tokenizer
from train.data import (
    PackedTokenSource,
    default_corpus_sources,
    ensure_prepared,
    make_eval_iterator,
    make_train_iterator,
    prepare,
    prepare_main,
    read_meta,
)
from train.data_corpus import write_stdlib_docs_corpus
from train.data_prepare import held_out_rows
from train.data_sources import iter_pieces

EOS = 151643  # Qwen2's <|endoftext|>, spelled out so a wrong constant in the code cannot agree with itself
SEQ_LEN = 16
WORDS = (
    "the model reads every token of a document and learns which word comes next; numbers like 1984 "
    "and 3.14 split into digits, while naïve café résumé keep their accents — 東京 and Zürich too"
).split()


def _document(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + ".")
    return rng.choice(["\n\n", "\n", "\r\n\r\n", "\n\n  "]).join(paragraphs)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return write_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="session")
def reference_tokenizer(tok_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Three .txt files (one document each) and a .jsonl file; returns (sources, documents in order)."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("corpus")
    sources, documents = [], []
    for i in range(3):
        text = _document(rng)
        path = directory / f"doc{i}.txt"
        path.write_bytes(text.encode("utf-8"))
        sources.append(path)
        documents.append(text)
    jsonl_documents = [_document(rng) for _ in range(40)]
    lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(jsonl_documents)]
    lines.insert(5, "")  # blank lines are skipped
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sources.append(directory / "docs.jsonl")
    documents.extend(jsonl_documents)
    return sources, documents


@pytest.fixture(scope="session")
def prepared(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        corpus[0],
        out,
        seq_len=SEQ_LEN,
        eval_sequences=5,
        tokenizer_dir=tok_dir,
        num_workers=1,
        progress=False,
        sequences_per_shard=16,
    )
    return out


def _stream_rows(data_dir: Path) -> np.ndarray:
    """All rows in stream order, re-merging the two splits."""
    meta = read_meta(data_dir)
    train, held_out = PackedTokenSource(data_dir, "train"), PackedTokenSource(data_dir, "eval")
    mask = held_out_rows(len(train) + len(held_out), len(held_out))
    rows = np.empty((len(mask), meta["seq_len"]), np.int32)
    rows[~mask] = [train[i] for i in range(len(train))]
    rows[mask] = [held_out[i] for i in range(len(held_out))]
    return rows


def _take(iterator, steps: int) -> list[np.ndarray]:
    return [next(iterator)["input_ids"] for _ in range(steps)]


# ---------------------------------------------------------------------------------------------
# Preparing


def test_packed_stream_is_documents_joined_by_eos(prepared, corpus, reference_tokenizer):
    expected = []
    for text in corpus[1]:
        expected += reference_tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
    meta = read_meta(prepared)
    stream = _stream_rows(prepared).reshape(-1)
    assert meta["tokens"] == len(expected) and meta["documents"] == len(corpus[1])
    assert meta["tokens_dropped"] == len(expected) % SEQ_LEN < SEQ_LEN
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    # Decoding the stream gives the documents back, separated by <|endoftext|>.
    decoded = reference_tokenizer.decode(stream.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    assert decoded[:-1] == corpus[1][: len(decoded) - 1]
    assert meta["eos_token_id"] == EOS and meta["seq_len"] == SEQ_LEN
    assert meta["splits"]["eval"]["sequences"] == 5
    assert len(meta["splits"]["train"]["shards"]) > 1  # sequences_per_shard=16 spreads the rows


def test_held_out_rows_are_spread_evenly():
    mask = held_out_rows(100, 7)
    assert mask.sum() == 7
    positions = np.flatnonzero(mask)
    assert positions[0] < 15 and positions[-1] > 85
    assert held_out_rows(10, 1).sum() == 1


def test_meta_records_sources_and_tokenizer(prepared, corpus):
    meta = read_meta(prepared)
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in corpus[0]]
    assert [s["documents"] for s in meta["sources"]] == [1, 1, 1, 40]
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in meta["sources"])
    assert meta["options"]["tokenizer"]["kind"] == "directory"
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_text_file_pieces_encode_like_the_whole_text(tmp_path, reference_tokenizer):
    rng = random.Random(1)
    text = "\ufeff" + "".join(_document(rng) + rng.choice(["\n\n", "\n", "\n\n\n \u3000", "\r\n"]) for _ in range(60))
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(iter_pieces(path, max_piece_chars=200))
    assert len(pieces) > 10 and [p.ends_document for p in pieces].count(True) == 1 and pieces[-1].ends_document
    assert "".join(p.text for p in pieces) == text[1:]  # the BOM is dropped, line endings are kept
    assert sum(p.nbytes for p in pieces) == path.stat().st_size
    whole = reference_tokenizer.encode(text[1:], add_special_tokens=False).ids
    joined = [t for p in pieces for t in reference_tokenizer.encode(p.text, add_special_tokens=False).ids]
    assert joined == whole


def test_special_token_text_is_not_a_separator(tmp_path, tok_dir):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "one <|endoftext|> two <|im_start|> " * 8}) + "\n", encoding="utf-8")
    meta = prepare(
        [path],
        tmp_path / "out",
        seq_len=4,
        eval_sequences=1,
        text_key="body",
        tokenizer_dir=tok_dir,
        num_workers=1,
        progress=False,
    )
    stream = _stream_rows(tmp_path / "out").reshape(-1)
    assert meta["documents"] == 1 and EOS not in stream[:-1] and 151644 not in stream


def test_worker_processes_give_the_same_shards(corpus, tok_dir, prepared, tmp_path):
    prepare(
        corpus[0],
        tmp_path / "parallel",
        seq_len=SEQ_LEN,
        eval_sequences=5,
        tokenizer_dir=tok_dir,
        num_workers=2,
        progress=False,
        sequences_per_shard=16,
    )
    assert read_meta(tmp_path / "parallel")["splits"] == read_meta(prepared)["splits"]


# ---------------------------------------------------------------------------------------------
# Errors and atomic output


def test_missing_source_is_named(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="source not found: .*nope.txt"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir)


def test_unsupported_source_type(tmp_path, tok_dir):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported source .*data.csv"):
        prepare([tmp_path / "data.csv"], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir)


def test_empty_corpus(tmp_path, tok_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="no text"):
        prepare(
            [tmp_path / "empty.txt", tmp_path / "empty.jsonl"],
            tmp_path / "out",
            seq_len=8,
            tokenizer_dir=tok_dir,
            num_workers=1,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_seq_len_too_large_for_the_corpus(tmp_path, tok_dir):
    (tmp_path / "small.txt").write_text("A short document.")
    with pytest.raises(ValueError, match="too few for two sequences of seq_len 4096"):
        prepare(
            [tmp_path / "small.txt"],
            tmp_path / "out",
            seq_len=4096,
            tokenizer_dir=tok_dir,
            num_workers=1,
            progress=False,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"seq_len": 8, "eval_fraction": 1.5}, "eval_fraction must be between 0 and 1"),
        ({"seq_len": 8, "eval_sequences": 0}, "eval_sequences must be an integer >= 1"),
        ({"seq_len": 8, "num_workers": 0}, "num_workers must be an integer >= 1"),
    ],
)
def test_bad_options(corpus, tok_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare(corpus[0], tmp_path / "out", tokenizer_dir=tok_dir, **kwargs)


def test_bad_jsonl_line_is_located(tmp_path, tok_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        prepare([path], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([path], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)


def test_failed_prepare_leaves_nothing_and_keeps_the_previous_directory(corpus, tok_dir, tmp_path):
    bad = tmp_path / "late-error.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[1]) + "{broken\n")
    with pytest.raises(ValueError, match="late-error.jsonl:44: not valid JSON"):
        prepare([bad], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late-error.jsonl"]  # no output, no temporary

    good = prepare(corpus[0], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(corpus[0], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare(
            [bad], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False, overwrite=True
        )
    assert read_meta(tmp_path / "out") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late-error.jsonl", "out"]


def test_overwrite_refuses_a_directory_that_is_not_prepared_data(corpus, tok_dir, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared data directory"):
        prepare(corpus[0], tmp_path / "precious", seq_len=8, tokenizer_dir=tok_dir, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# ensure_prepared


def test_ensure_prepared_reuses_and_refreshes(corpus, tok_dir, tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[1]))
    data = tmp_path / "cache" / "data"
    first = ensure_prepared([source], data, seq_len=SEQ_LEN, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    written_at = (data / "meta.json").stat().st_mtime_ns
    assert ensure_prepared([source], data, seq_len=SEQ_LEN, tokenizer_dir=tok_dir, progress=False) == first

    source.write_text(source.read_text())  # same content, new mtime: the hash decides, still reused
    assert ensure_prepared([source], data, seq_len=SEQ_LEN, tokenizer_dir=tok_dir, progress=False) == first
    assert (data / "meta.json").stat().st_mtime_ns == written_at

    source.write_text(source.read_text() + json.dumps({"text": "One more document."}) + "\n")
    changed = ensure_prepared([source], data, seq_len=SEQ_LEN, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    assert changed["documents"] == first["documents"] + 1
    other_len = ensure_prepared([source], data, seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    assert other_len["seq_len"] == 8 and read_meta(data) == other_len
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]


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
    a = _take(make_train_iterator(prepared, global_batch_size=4, seed=3, process_index=0, process_count=1), 5)
    b = _take(make_train_iterator(prepared, global_batch_size=4, seed=3, process_index=0, process_count=1), 5)
    c = _take(make_train_iterator(prepared, global_batch_size=4, seed=4, process_index=0, process_count=1), 5)
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
    whole = _take(make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=0, process_count=1), 12)
    parts = [
        _take(
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
    unbroken = _take(
        make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1), steps_before + 6
    )
    first = make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1)
    _take(first, steps_before)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_sample"] == steps_before * 8
    resumed = make_train_iterator(prepared, global_batch_size=8, seed=5, process_index=0, process_count=1, state=state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 6)), np.stack(unbroken[steps_before:]))
    # set_state also rewinds an iterator that has run ahead
    _take(first, 4)
    first.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(first, 6)), np.stack(unbroken[steps_before:]))


def test_elastic_resume_with_another_process_count_and_batch_size(prepared):
    unbroken = np.concatenate(
        _take(make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=0, process_count=1), 20)
    )
    two = [
        make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=p, process_count=2) for p in range(2)
    ]
    for iterator in two:
        _take(iterator, 5)
    states = [iterator.get_state() for iterator in two]
    assert states[0] == states[1]  # one state for all processes

    one = make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=0, process_count=1, state=states[0])
    np.testing.assert_array_equal(np.concatenate(_take(one, 4)), unbroken[40:72])
    # 4 processes with a global batch of 12 continue from the same global sample
    four = [
        make_train_iterator(prepared, global_batch_size=12, seed=2, process_index=p, process_count=4, state=states[0])
        for p in range(4)
    ]
    steps = [_take(iterator, 3) for iterator in four]
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


# ---------------------------------------------------------------------------------------------
# CLI


def test_prepare_cli_success_with_the_default_tokenizer(corpus, tmp_path, capsys):
    code = prepare_main(
        [
            *map(str, corpus[0]),
            "--out",
            str(tmp_path / "out"),
            "--seq-len",
            "32",
            "--eval-fraction",
            "0.1",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    meta = read_meta(tmp_path / "out")
    assert summary["train_sequences"] == meta["splits"]["train"]["sequences"] > 0
    assert meta["options"]["tokenizer"]["kind"] == "qwen2-builtin" and meta["eos_token_id"] == EOS
    config = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.txt", "--out", "OUT", "--seq-len", "8"], "source not found"),
        (["SRC", "--out", "OUT", "--seq-len", "zero"], "invalid int value"),
        (["SRC", "--seq-len", "8"], "the following arguments are required: --out"),
        (["SRC", "--out", "OUT", "--seq-len", "100000"], "too few for two sequences"),
        (["SRC", "--out", "OUT", "--seq-len", "8", "--eval-fraction", "0.1", "--eval-sequences", "2"], "not allowed"),
    ],
)
def test_prepare_cli_bad_input_exits_2_with_one_line(corpus, tok_dir, tmp_path, capsys, argv, message):
    argv = [str(corpus[0][0]) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert prepare_main([*argv, "--tokenizer", str(tok_dir), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# The default corpus


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory) -> Path:
    return default_corpus_sources(tmp_path_factory.mktemp("cache"))[0]


def test_default_corpus_is_real_english_from_the_standard_library(default_corpus, tmp_path):
    documents = [json.loads(line) for line in default_corpus.read_text(encoding="utf-8").splitlines()]
    assert len(documents) > 300 and sum(len(d["text"]) for d in documents) > 1_000_000
    by_source = {d["source"]: d["text"] for d in documents}
    assert "Serialize ``obj`` to a JSON formatted ``str``." in by_source["json/__init__.py"]
    assert any(source.startswith("pydoc_data/topics.py:") for source in by_source)
    # Built twice (from one package, to keep the test short), it is the same file, byte for byte.
    email_package = Path(sysconfig.get_paths()["stdlib"]) / "email"
    first = write_stdlib_docs_corpus(tmp_path / "first.jsonl", stdlib_dir=email_package).read_bytes()
    second = write_stdlib_docs_corpus(tmp_path / "second.jsonl", stdlib_dir=email_package).read_bytes()
    assert first == second and b"mime/text.py" in first


def test_default_corpus_prepares_once_and_trains(default_corpus, tmp_path, reference_tokenizer):
    meta = ensure_prepared([default_corpus], tmp_path / "data", seq_len=128, eval_fraction=0.02, progress=False)
    assert meta["tokens"] > 300_000 and meta["splits"]["eval"]["sequences"] >= 50
    assert ensure_prepared([default_corpus], tmp_path / "data", seq_len=128, eval_fraction=0.02, progress=False) == meta
    batch = next(make_train_iterator(tmp_path / "data", global_batch_size=2, seed=0, process_index=0, process_count=1))
    text = reference_tokenizer.decode(batch["input_ids"][0].tolist())
    assert sum(word in text.split() for word in ("the", "a", "is", "of", "to")) >= 2
