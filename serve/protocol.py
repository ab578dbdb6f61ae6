"""OpenAI request bodies -> `Job`s (a `GenerationRequest` plus how to answer it), one per prompt:
every 400 is decided here.

Fields as vLLM's OpenAI server takes them. Unknown fields are ignored, as OpenAI does; a known field
with a wrong type or value is refused with one line that names it. Types are strict: `"5"` is not a
number and `true` is not an integer.

Defaults (vLLM's): sampling settings a request leaves unset come from the checkpoint's
generation_config.json, else temperature 1.0 and every filter off. `max_tokens` left unset is 16 on
/v1/completions (OpenAI's and vLLM's default) and the rest of the context on /v1/chat/completions,
each capped by the room left in the context and by generation_config.json's `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.errors import ModelNotFound
from serve.requests import MAX_TOP_LOGPROBS, GenerationRequest, SamplingSettings, ServeError
from serve.served_model import ServedModel

COMPLETION_DEFAULT_MAX_TOKENS = 16
SEED_RANGE = (-(2**63), 2**63 - 1)  # vLLM's: a signed 64-bit integer
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated prompt. kind: "completion" or "chat". prompt_text: the prompt as text (echo).
    logprobs: None, or how many alternatives each token's log-probability comes with. stop: stop
    strings (held back from the stream, cut from the output)."""

    kind: str
    request: GenerationRequest
    index: int = 0  # the choice's index: its place in a completion request's batch of prompts
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_text: str = ""
    logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_ids: bool = False

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids


# ----------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _CommonBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Any = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    ignore_eos: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False


class CompletionBody(_CommonBody):
    prompt: Any = None
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: str
    content: Any = None
    name: str | None = None


class ChatBody(_CommonBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


# ----------------------------------------------------------------------------------- entry points
def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says why it is not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServeError("the request body is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ServeError(f"malformed JSON in the request body: {e}") from None


def parse_completion(data: Any, model: ServedModel) -> list[Job]:
    """One job per prompt: `prompt` may be a batch (several strings or token-id lists), answered as
    that many choices, `index` in the batch's order."""
    body = _validate(CompletionBody, data)
    _check_common(body, model)
    if body.best_of is not None and body.best_of != 1:
        raise ServeError(f"best_of must be 1 (one completion per request), got {body.best_of}", param="best_of")
    if body.suffix:
        raise ServeError("suffix is not supported", param="suffix")
    logprobs = _top_count(body.logprobs, "logprobs")
    echo = bool(body.echo)
    jobs = []
    for index, (ids, text) in enumerate(_completion_prompts(body.prompt, model)):
        max_tokens = _max_tokens(body.max_tokens, "max_tokens", len(ids), model, default=COMPLETION_DEFAULT_MAX_TOKENS)
        prompt_logprobs = logprobs if echo else None
        request = _generation_request(body, model, ids, max_tokens, logprobs, prompt_logprobs=prompt_logprobs)
        jobs.append(
            _job("completion", body, request, model, echo=echo, prompt_text=text, logprobs=logprobs, index=index)
        )
    return jobs


def parse_chat(data: Any, model: ServedModel) -> list[Job]:
    body = _validate(ChatBody, data)
    _check_common(body, model)
    if body.tools:
        raise ServeError("tools are not supported", param="tools")
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise ServeError(f"response_format {fmt!r} is not supported (only 'text')", param="response_format")
    ids = _chat_prompt(body, model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ServeError("top_logprobs needs logprobs set to true", param="top_logprobs")
    logprobs = _top_count(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
    if body.max_completion_tokens is not None:
        max_tokens = _max_tokens(body.max_completion_tokens, "max_completion_tokens", len(ids), model, default=None)
    else:
        max_tokens = _max_tokens(body.max_tokens, "max_tokens", len(ids), model, default=None)
    request = _generation_request(body, model, ids, max_tokens, logprobs, prompt_logprobs=None)
    return [_job("chat", body, request, model, logprobs=logprobs)]


# ----------------------------------------------------------------------------------- checks
def _validate(cls: type[_Body], data: Any):
    if not isinstance(data, dict):
        raise ServeError(f"the request body must be a JSON object, got {_json_type(data)}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None


def _first_error(error: ValidationError) -> ServeError:
    e = error.errors()[0]
    loc = e["loc"]
    path = _path(loc)
    param = str(loc[0]) if loc else None
    if e["type"] == "missing":
        return ServeError(f"{path} is required", param=param)
    return ServeError(f"{path}: {e['msg'].lower()}, got {_short(e.get('input'))}", param=param)


def _path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _check_common(body: _CommonBody, model: ServedModel) -> None:
    if body.model is not None and body.model != model.name:
        raise ModelNotFound(f"the model `{body.model}` does not exist (this server has `{model.name}`)", param="model")
    if body.n is not None and body.n != 1:
        raise ServeError(f"n must be 1 (one choice per request), got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value:
            raise ServeError(f"{name} is not supported (use repetition_penalty), got {value}", param=name)
    if body.logit_bias:
        raise ServeError("logit_bias is not supported", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise ServeError("stream_options is only allowed when stream is true", param="stream_options")


def _completion_prompts(prompt: Any, model: ServedModel) -> list[tuple[tuple[int, ...], str]]:
    """(token ids, text) of each prompt: `prompt` is a string, a list of token ids, or a batch (a list
    of strings and token-id lists)."""
    if prompt is None:
        raise ServeError("prompt is required", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [_one_prompt(p, f"prompt[{i}]", model) for i, p in enumerate(prompt)]
    return [_one_prompt(prompt, "prompt", model)]


def _one_prompt(prompt: Any, where: str, model: ServedModel) -> tuple[tuple[int, ...], str]:
    if isinstance(prompt, str):
        if not prompt:
            raise ServeError(f"{where} is empty", param="prompt")
        ids = tuple(_tokenizer(model, "a text prompt").encode(prompt))
        if not ids:
            raise ServeError(f"{where} is empty (0 tokens)", param="prompt")
        return ids, prompt
    if not isinstance(prompt, list):
        raise ServeError(
            f"{where} must be a string, a list of token ids, or a list of those, got {_json_type(prompt)}",
            param="prompt",
        )
    if not prompt:
        raise ServeError(f"{where} is empty (0 tokens)", param="prompt")
    ids = _token_ids(prompt, where, model, param="prompt")
    text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
    return ids, text


def _token_ids(values: list[Any], what: str, model: ServedModel, param: str | None = None) -> tuple[int, ...]:
    param = param or what
    for i, t in enumerate(values):
        if not isinstance(t, int) or isinstance(t, bool):
            raise ServeError(f"{what}[{i}] must be an integer token id, got {_short(t)}", param=param)
        if not 0 <= t < model.vocab_size:
            raise ServeError(
                f"{what}[{i}]: token id {t} is outside the model's vocabulary [0, {model.vocab_size})", param=param
            )
    return tuple(values)


def _tokenizer(model: ServedModel, what: str):
    if model.tokenizer is None:
        raise ServeError(f"this model has no tokenizer (no tokenizer.json), so {what} cannot be read: send token ids")
    return model.tokenizer


def _chat_prompt(body: ChatBody, model: ServedModel) -> tuple[int, ...]:
    if not body.messages:
        raise ServeError("messages must hold at least one message", param="messages")
    messages = [_chat_message(i, m) for i, m in enumerate(body.messages)]
    tokenizer = _tokenizer(model, "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except ValueError as e:
        raise ServeError(str(e), param="messages") from None
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise ServeError("the chat template rendered an empty prompt (0 tokens)", param="messages")
    return ids


def _chat_message(i: int, message: ChatMessage) -> dict[str, str]:
    where = f"messages[{i}]"
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
    if role not in CHAT_ROLES:
        raise ServeError(f"{where}.role must be one of {sorted(CHAT_ROLES | {'developer'})}, got {role!r}", "messages")
    content = message.content
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = "\n".join(_text_part(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise ServeError(
            f"{where}.content must be a string or a list of text parts, got {_json_type(content)}", "messages"
        )
    out = {"role": role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    return out


def _text_part(where: str, part: Any) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else _json_type(part)
        raise ServeError(f"{where}: content part of type {kind!r} is not supported (only 'text')", "messages")
    text = part.get("text")
    if not isinstance(text, str):
        raise ServeError(f"{where}.text must be a string, got {_short(text)}", "messages")
    return text


def _top_count(value: int | None, name: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ServeError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param=name)
    return value


def _max_tokens(value: int | None, name: str, prompt_len: int, model: ServedModel, default: int | None) -> int:
    """The request's max_tokens, or its default; refused when prompt + max_tokens runs past the context."""
    context = model.max_model_len
    room = context - prompt_len
    if value is None:
        if room <= 0:
            raise ServeError(
                f"the prompt has {prompt_len} tokens and this model's maximum context length is {context} tokens: "
                "no room to generate",
                param=name,
            )
        return min([room] + [c for c in (default, model.max_new_tokens) if c is not None])
    if value < 0:
        raise ServeError(f"{name} must be >= 0, got {value}", param=name)
    if prompt_len + value > context:
        raise ServeError(
            f"this model's maximum context length is {context} tokens, but the request asks for "
            f"{prompt_len + value} ({prompt_len} in the prompt + {value} from {name}): shorten the prompt "
            f"or lower {name}",
            param=name,
        )
    return value


def _stop_strings(stop: Any, model: ServedModel) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ServeError(f"stop must be a string or a list of strings, got {_short(stop)}", param="stop")
    if any(s == "" for s in stops):
        raise ServeError("stop strings must not be empty", param="stop")
    if stops:
        _tokenizer(model, "stop strings")
    return tuple(dict.fromkeys(stops))


def _sampling(body: _CommonBody, model: ServedModel) -> SamplingSettings:
    def pick(name, fallback):
        value = getattr(body, name)
        return model.sampling_default(name, fallback) if value is None else value

    top_k = pick("top_k", 0)
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    seed = body.seed
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ServeError(f"seed must be a 64-bit signed integer, got {seed}", param="seed")
    try:
        return SamplingSettings(
            temperature=float(pick("temperature", 1.0)),
            top_k=int(top_k),
            top_p=float(pick("top_p", 1.0)),
            min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            seed=seed,
        )
    except ValueError as e:
        message = str(e)
        raise ServeError(message, param=message.split(" ", 1)[0]) from None


def _generation_request(
    body: _CommonBody,
    model: ServedModel,
    ids: tuple[int, ...],
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> GenerationRequest:
    extra = _token_ids(body.stop_token_ids, "stop_token_ids", model) if body.stop_token_ids else ()
    stop_ids = (() if body.ignore_eos else model.eos_ids) + extra
    return GenerationRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        sampling=_sampling(body, model),
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _job(kind: str, body: _CommonBody, request: GenerationRequest, model: ServedModel, **kw) -> Job:
    return Job(
        kind=kind,
        request=request,
        stop=_stop_strings(body.stop, model),
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        return_token_ids=bool(body.return_token_ids),
        tokens_as_ids=bool(body.return_tokens_as_token_ids),
        **kw,
    )
