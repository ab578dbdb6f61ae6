"""Training data, preparing: packed token shards with the real Qwen2 tokenizer (EOS between documents,
held-out split, worker processes), errors and atomic output, ensure_prepared, the prepare CLI and the
default corpus."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from train.data import (
    default_corpus_sources,
    ensure_prepared,
    make_train_iterator,
    prepare,
    prepare_main,
    read_meta,
)
from train.data_corpus import write_stdlib_docs_corpus
from train.data_prepare import held_out_rows
from train.data_sources import iter_pieces
from train_data_utils import EOS, SEQ_LEN, document, stream_rows

# ---------------------------------------------------------------------------------------------
# Preparing


def test_packed_stream_is_documents_joined_by_eos(prepared, data_corpus, reference_tokenizer):
    expected = []
    for text in data_corpus[1]:
        expected += reference_tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
    meta = read_meta(prepared)
    stream = stream_rows(prepared).reshape(-1)
    assert meta["tokens"] == len(expected) and meta["documents"] == len(data_corpus[1])
    assert meta["tokens_dropped"] == len(expected) % SEQ_LEN < SEQ_LEN
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    # Decoding the stream gives the documents back, separated by <|endoftext|>.
    decoded = reference_tokenizer.decode(stream.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    assert decoded[:-1] == data_corpus[1][: len(decoded) - 1]
    assert meta["eos_token_id"] == EOS and meta["seq_len"] == SEQ_LEN
    assert meta["splits"]["eval"]["sequences"] == 5
    assert len(meta["splits"]["train"]["shards"]) > 1  # sequences_per_shard=16 spreads the rows


def test_held_out_rows_are_spread_evenly():
    mask = held_out_rows(100, 7)
    assert mask.sum() == 7
    positions = np.flatnonzero(mask)
    assert positions[0] < 15 and positions[-1] > 85
    assert held_out_rows(10, 1).sum() == 1


def test_meta_records_sources_and_tokenizer(prepared, data_corpus):
    meta = read_meta(prepared)
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in data_corpus[0]]
    assert [s["documents"] for s in meta["sources"]] == [1, 1, 1, 40]
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in meta["sources"])
    assert meta["options"]["tokenizer"]["kind"] == "directory"
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_text_file_pieces_encode_like_the_whole_text(tmp_path, reference_tokenizer):
    rng = random.Random(1)
    text = "\ufeff" + "".join(document(rng) + rng.choice(["\n\n", "\n", "\n\n\n \u3000", "\r\n"]) for _ in range(60))
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
    stream = stream_rows(tmp_path / "out").reshape(-1)
    assert meta["documents"] == 1 and EOS not in stream[:-1] and 151644 not in stream


def test_worker_processes_give_the_same_shards(data_corpus, tok_dir, prepared, tmp_path):
    prepare(
        data_corpus[0],
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
def test_bad_options(data_corpus, tok_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare(data_corpus[0], tmp_path / "out", tokenizer_dir=tok_dir, **kwargs)


def test_bad_jsonl_line_is_located(tmp_path, tok_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        prepare([path], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([path], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)


def test_failed_prepare_leaves_nothing_and_keeps_the_previous_directory(data_corpus, tok_dir, tmp_path):
    bad = tmp_path / "late-error.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in data_corpus[1]) + "{broken\n")
    with pytest.raises(ValueError, match="late-error.jsonl:44: not valid JSON"):
        prepare([bad], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late-error.jsonl"]  # no output, no temporary

    good = prepare(data_corpus[0], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(data_corpus[0], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare(
            [bad], tmp_path / "out", seq_len=8, tokenizer_dir=tok_dir, num_workers=1, progress=False, overwrite=True
        )
    assert read_meta(tmp_path / "out") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late-error.jsonl", "out"]


def test_overwrite_refuses_a_directory_that_is_not_prepared_data(data_corpus, tok_dir, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared data directory"):
        prepare(data_corpus[0], tmp_path / "precious", seq_len=8, tokenizer_dir=tok_dir, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# ensure_prepared


def test_ensure_prepared_reuses_and_refreshes(data_corpus, tok_dir, tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in data_corpus[1]))
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
# CLI


def test_prepare_cli_success_with_the_default_tokenizer(data_corpus, tmp_path, capsys):
    code = prepare_main(
        [
            *map(str, data_corpus[0]),
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
def test_prepare_cli_bad_input_exits_2_with_one_line(data_corpus, tok_dir, tmp_path, capsys, argv, message):
    argv = [str(data_corpus[0][0]) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert prepare_main([*argv, "--tokenizer", str(tok_dir), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# The default data_corpus


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
