"""SFT rows (TRL's dataset formats) -> token ids with loss labels, rendered by the model's chat template.

Accepted JSONL rows, as TRL's SFTTrainer takes them:
  conversational     {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
  prompt-completion  {"prompt": str, "completion": str}                      plain text, EOS appended
                     {"prompt": [messages], "completion": [messages]}        rendered like a conversation

What is trained (`assistant_only`, default): each assistant turn's tokens through its end-of-turn
token (`<|im_end|>` in ChatML), not the template text around it (`<|im_start|>assistant\\n`, the
newline after `<|im_end|>`); for prompt-completion rows the completion only (its assistant turns, or
the completion text plus EOS). With assistant_only false, every token.

Finding the assistant spans works for any template that renders a conversation prefix by prefix (as
chat templates must, for multi-turn generation): the characters before turn i are the rendering of
messages[:i] with the generation prompt, the turn ends where the rendering of messages[:i+1] ends,
less trailing whitespace. Tokens that overlap a span are assistant tokens, as in transformers'
`return_assistant_tokens_mask` (tested against it). A row that cannot be used raises ChatDataError
with its file, line and field, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qwen2_jax.cli_support import UsageError
from qwen2_jax.tokenizer import Qwen2Tokenizer
from qwen2_jax.tokenizer_build import QWEN2_CHAT_TEMPLATE
from train.packing import IGNORE_INDEX, Document

ROLES = ("system", "user", "assistant", "tool")  # the roles of TRL's formats and of Qwen2's templates


class ChatDataError(UsageError, ValueError):
    """An SFT row that cannot be trained on: bad input, exit status 2."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The checkpoint's chat template, or Qwen2's ChatML when it has none."""

    tokenizer: Qwen2Tokenizer
    is_fallback: bool

    @classmethod
    def of(cls, tokenizer: Qwen2Tokenizer) -> ChatTemplate:
        if tokenizer.config.get("chat_template"):
            return cls(tokenizer, False)
        config = dict(tokenizer.config, chat_template=QWEN2_CHAT_TEMPLATE)
        return cls(Qwen2Tokenizer(tokenizer.backend, config), True)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


class ChatRenderer:
    """Rows -> Documents (input_ids, labels). `where` in every error: "FILE:LINE"."""

    def __init__(self, tokenizer: Qwen2Tokenizer, *, assistant_only: bool = True):
        self.template = ChatTemplate.of(tokenizer)
        self.tokenizer = self.template.tokenizer
        self.assistant_only = assistant_only
        self._eos = self._eos_text()

    def _eos_text(self) -> str:
        token_id = self.tokenizer.eos_token_id
        return "" if token_id is None else self.tokenizer.decode([token_id])

    # ------------------------------------------------------------------------------- a row
    def document(self, row: Any, where: str) -> Document:
        if not isinstance(row, Mapping):
            raise ChatDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if "messages" in row:
            messages = _messages(row["messages"], f"{where}: messages")
            trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            return self._conversation(messages, trained, where, "messages")
        if "prompt" in row:
            if "completion" not in row:
                raise ChatDataError(f"{where}: completion: missing (a row with a prompt needs a completion)")
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                return self._text(prompt, completion, where)
            if isinstance(prompt, list) and isinstance(completion, list):
                prompt_messages = _messages(prompt, f"{where}: prompt")
                completion_messages = _messages(completion, f"{where}: completion")
                messages = prompt_messages + completion_messages
                trained = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
                return self._conversation(messages, trained, where, "completion")
            raise ChatDataError(
                f"{where}: prompt, completion: both strings or both message lists, got "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        raise ChatDataError(f"{where}: no 'messages' or 'prompt' field (found: {', '.join(map(str, row)) or 'none'})")

    def _text(self, prompt: str, completion: str, where: str) -> Document:
        if not completion.strip():
            raise ChatDataError(f"{where}: completion: empty")
        if self._eos and not completion.endswith(self._eos):
            completion += self._eos  # as TRL does: the model learns to stop
        text = prompt + completion
        return self._document(text, [(len(prompt), len(text))])

    def _conversation(self, messages: list[dict], trained: list[int], where: str, field: str) -> Document:
        if self.assistant_only and not trained:
            raise ChatDataError(
                f"{where}: {field}: no assistant turn to learn from (loss.assistant_only is true, so nothing "
                "in this row would be trained)"
            )
        if trained and trained[0] == 0:
            # the template's text before a first turn (a default system prompt) cannot be told apart from it
            raise ChatDataError(
                f"{where}: {field}[0].role: a conversation cannot open with an assistant turn (put a system or "
                "user turn first)"
            )
        full = self._render(messages, False, where, field)
        spans = []
        for i in trained:
            before = self._render(messages[:i], True, where, field)
            through = self._render(messages[: i + 1], False, where, field)
            if not (full.startswith(through) and through.startswith(before)):
                raise ChatDataError(
                    f"{where}: {field}: the chat template does not render this conversation prefix by prefix "
                    f"(turn {i}), so its assistant tokens cannot be told apart"
                )
            spans.append((len(before), len(through.rstrip())))
        return self._document(full, spans)

    def _render(self, messages: list[dict], generation_prompt: bool, where: str, field: str) -> str:
        try:
            return self.template.render(messages, generation_prompt)
        except Exception as e:  # a template's raise_exception, or a jinja error on an odd message
            raise ChatDataError(f"{where}: {field}: the chat template refuses it: {e}") from None

    def _document(self, text: str, spans: list[tuple[int, int]]) -> Document:
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, np.int32)
        if not self.assistant_only:
            return Document(ids, ids.copy())
        starts = np.asarray([o[0] for o in encoding.offsets])
        ends = np.asarray([o[1] for o in encoding.offsets])
        trained = np.zeros(len(ids), bool)
        for start, end in spans:
            trained |= (ends > start) & (starts < end)
        return Document(ids, np.where(trained, ids, IGNORE_INDEX).astype(np.int32))


def _messages(value: Any, where: str) -> list[dict]:
    """The message list, checked: objects with a known role and string content, no empty assistant turn."""
    if not isinstance(value, list):
        raise ChatDataError(f"{where}: must be a list of messages, got {type(value).__name__}")
    if not value:
        raise ChatDataError(f"{where}: empty")
    out = []
    for i, message in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(message, Mapping):
            raise ChatDataError(f"{field}: a message must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            what = "missing" if role is None else f"{role!r} is not a role the chat template knows"
            raise ChatDataError(f"{field}.role: {what} ({', '.join(ROLES)})")
        if not isinstance(content, str):
            what = "missing" if content is None else f"must be a string, got {type(content).__name__}"
            raise ChatDataError(f"{field}.content: {what}")
        if role == "assistant" and not content.strip():
            raise ChatDataError(f"{field}.content: an empty assistant turn")
        out.append(dict(message))
    return out


def read_rows(path: str) -> Iterator[tuple[Any, str]]:
    """(row, "FILE:LINE") for every non-blank line of a JSONL file; ChatDataError on a line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def jsonl_files(sources: Sequence[str]) -> list[str]:
    """The .jsonl files of the sources (files, or directories searched recursively), in a stable order."""
    files = []
    for source in sources:
        path = os.path.abspath(os.path.expanduser(source))
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(".jsonl")
            )
            if not found:
                raise ChatDataError(f"data.sources: {path} holds no .jsonl file")
            files += found
        elif os.path.isfile(path):
            if not path.endswith(".jsonl"):
                raise ChatDataError(f"data.sources: {path}: SFT data must be JSONL (.jsonl)")
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus not found: {path}")
    return files
