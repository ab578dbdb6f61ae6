"""What the HTTP layer knows about the model it serves: its name, tokenizer, limits and defaults.

Built once at start-up from the checkpoint directory; the protocol layer reads it to turn an OpenAI
request into token ids and sampling settings, the response layer to turn token ids into text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from qwen2_jax.config import Qwen2Config
from qwen2_jax.sampling import GENERATION_CONFIG_FILE, eos_ids_of, load_generation_config
from qwen2_jax.tokenizer import TOKENIZER_FILE, Qwen2Tokenizer, load_tokenizer

# Keys of generation_config.json (as `load_generation_config` names them) that become request defaults.
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """name: the `model` clients send. vocab_size: the model's (padded) vocabulary, the bound on token
    ids. max_model_len: prompt + generated tokens per request. eos_ids: the tokens that end a reply.
    defaults: the values of sampling settings a request leaves unset, from generation_config.json
    (`request_defaults`), plus `max_new_tokens` when the file caps replies."""

    name: str
    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]
    defaults: Mapping[str, Any]
    tokenizer: Qwen2Tokenizer | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.defaults.get("max_new_tokens")

    def sampling_default(self, key: str, fallback):
        value = self.defaults.get(key)
        return fallback if value is None else value


def request_defaults(checkpoint: str) -> dict[str, Any]:
    """The sampling values generation_config.json sets, as vLLM takes them: each value the file has,
    whatever its `do_sample` (a base model's file, with do_sample false and no temperature, leaves
    requests at temperature 1.0, as in vLLM; HF's generate would be greedy)."""
    path = os.path.join(checkpoint, GENERATION_CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)  # load_generation_config has read it already: valid JSON
    out: dict[str, Any] = {}
    for key in (*SAMPLING_KEYS, "max_new_tokens"):
        value = raw.get(key)
        if value is None:
            continue
        integral = key in ("top_k", "max_new_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise ValueError(f"{path}: {key} must be {'an integer' if integral else 'a number'}, got {value!r}")
        out[key] = value
    return out


def default_model_name(checkpoint: str) -> str:
    """The checkpoint directory's name, as vLLM names a model by its path."""
    return os.path.basename(os.path.normpath(os.path.abspath(checkpoint)))


def load_tokenizer_if_any(checkpoint: str) -> Qwen2Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json (then only token-id prompts
    are served). A tokenizer.json that exists but cannot be read is an error (ValueError / OSError)."""
    if not os.path.exists(os.path.join(checkpoint, TOKENIZER_FILE)):
        return None
    return load_tokenizer(checkpoint)


def served_model(
    checkpoint: str,
    config: Qwen2Config,
    *,
    name: str,
    max_model_len: int,
    tokenizer: Qwen2Tokenizer | None,
) -> ServedModel:
    gen = load_generation_config(checkpoint)
    eos = list(eos_ids_of(config, gen))
    # vLLM stops at the tokenizer's eos token as well as generation_config's: for a chat template
    # that closes turns with <|im_end|>, that is the end of the reply.
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    defaults = request_defaults(checkpoint)
    return ServedModel(
        name=name,
        vocab_size=config.vocab_size,
        max_model_len=max_model_len,
        eos_ids=tuple(eos),
        defaults=defaults,
        tokenizer=tokenizer,
    )
