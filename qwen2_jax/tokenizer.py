"""Qwen2 tokenizer: load a checkpoint's tokenizer.json + tokenizer_config.json and use it.

`load_tokenizer` reads such a directory (a real checkpoint's, or one written by
`qwen2_jax.tokenizer_build.write_qwen2_tokenizer`) without importing transformers: encoding and
decoding go through the `tokenizers` library, chat templates through jinja2 with transformers'
settings, and `IncrementalDecoder` streams text without splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_content(value: Any) -> str | None:
    # Older configs store specials as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _load_backend(path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers file: {err}") from err


def _raise_exception(message: str) -> None:
    # Chat templates call this to reject malformed conversations.
    raise ValueError(f"chat template error: {message}")


@lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    # Same environment as transformers: sandboxed, HF whitespace control,
    # loop controls, and the raise_exception helper.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


class IncrementalDecoder:
    """Turns a growing list of token ids into text, emitting only complete characters.

    Byte-level BPE tokens can end inside a UTF-8 sequence (CJK, emoji), so text
    is decoded from bytes with an incremental UTF-8 decoder; concatenating all
    outputs (plus `flush()`) equals `decode(ids)` with the same options.
    """

    def __init__(self, tokenizer: Qwen2Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._consumed = 0

    def update(self, ids: Sequence[int]) -> str:
        """Feed the full id list so far; return the text completed since the last call."""
        if len(ids) < self._consumed:
            raise ValueError(f"token list shrank from {self._consumed} to {len(ids)} ids")
        new_ids = ids[self._consumed :]
        self._consumed = len(ids)
        return self._utf8.decode(self._tokenizer.ids_to_bytes(new_ids, self._skip_special))

    def flush(self) -> str:
        """Text for trailing bytes of an unfinished character (U+FFFD), at end of stream."""
        return self._utf8.decode(b"", final=True)


class Qwen2Tokenizer:
    """A `tokenizers.Tokenizer` plus the settings of tokenizer_config.json."""

    def __init__(self, backend: Tokenizer, config: Mapping[str, Any], source: Path | None = None):
        self._backend = backend
        self._config = dict(config)
        self._source = source
        self._special_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self._id_bytes: dict[int, bytes] = {}

    @property
    def backend(self) -> Tokenizer:
        return self._backend

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings become their ids, no BOS/EOS is added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def ids_to_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        """Raw bytes the ids stand for (specials as their UTF-8 text)."""
        return b"".join(self._token_bytes(i) for i in ids if not (skip_special_tokens and i in self._special_ids))

    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._id_bytes.get(token_id)
        if cached is not None:
            return cached
        token = self._backend.id_to_token(token_id)
        if token is None:
            # The model's embedding is padded past the vocabulary (151,936 vs
            # 151,646 rows); `decode` drops such ids, so the stream does too.
            return b""
        self._id_bytes[token_id] = value = self._unicode_token_to_bytes(token_id, token)
        return value

    def _unicode_token_to_bytes(self, token_id: int, token: str) -> bytes:
        # Mirrors the ByteLevel decoder: a token with a character outside the
        # byte alphabet (an added token) is taken as its own UTF-8 text.
        if token_id in self._special_ids:
            return token.encode("utf-8")
        table = unicode_to_bytes()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render the checkpoint's Jinja chat template to a prompt string."""
        template = self._config.get("chat_template")
        if isinstance(template, list):
            # Newer configs store named templates: [{"name": "default", "template": ...}, ...].
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not template:
            where = self._source / TOKENIZER_CONFIG_FILE if self._source else TOKENIZER_CONFIG_FILE
            raise ValueError(f"{where} has no chat_template; cannot apply a chat template")
        return _compile_chat_template(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=_token_content(self._config.get("bos_token")) or "",
            eos_token=_token_content(self._config.get("eos_token")) or "",
            **kwargs,
        )

    def _special_id(self, key: str) -> int | None:
        content = _token_content(self._config.get(key))
        if content is None:
            return None
        token_id = self._backend.token_to_id(content)
        if token_id is None:
            raise ValueError(f"{key} {content!r} from {TOKENIZER_CONFIG_FILE} is not in the vocabulary")
        return token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Real vocabulary incl. added tokens (151,646), smaller than the model's padded embedding."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids


def load_tokenizer(directory: str | os.PathLike) -> Qwen2Tokenizer:
    """Load tokenizer.json + tokenizer_config.json from a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} not found")
    config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    if not config.get("chat_template") and (directory / CHAT_TEMPLATE_FILE).is_file():
        # transformers 5's save_pretrained writes the template beside tokenizer_config.json, not into it
        config["chat_template"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    backend = _load_backend(directory / TOKENIZER_FILE)
    return Qwen2Tokenizer(backend, config, source=directory)
