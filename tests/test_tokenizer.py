"""qwen2_jax.tokenizer on the built Qwen2 tokenizer: round trips, streaming decode, chat templates
(equal to transformers'), and errors on a broken directory."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from qwen2_jax.tokenizer import Qwen2Tokenizer, load_tokenizer
from tokenizer_utils import (
    CONVERSATION,
    SAMPLES,
    SYSTEM,
    nfc,
)

# --- round trip ------------------------------------------------------------------------------


def test_roundtrip_samples_and_corpus(tok, corpus):
    texts = list(SAMPLES.values()) + corpus
    bad = [t for t in texts if tok.decode(tok.encode(t)) != nfc(t)]
    assert not bad, f"{len(bad)} texts do not round-trip, first: {bad[0]!r}"


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


def test_missing_chat_template(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi") == [6023]
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CONVERSATION)


def test_chat_template_saved_beside_the_config_by_transformers(tmp_path, tok_dir, hf_tok):
    """transformers 5's save_pretrained writes chat_template.jinja, not a tokenizer_config.json entry."""
    hf_tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in config and (tmp_path / "chat_template.jinja").is_file()
    ours = load_tokenizer(tmp_path).apply_chat_template(CONVERSATION)
    assert ours == hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


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
