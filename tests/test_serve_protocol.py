"""qwen2-serve without a server: request validation and defaults (serve/protocol.py), stop strings held
back from the stream (serve/text.py), and OpenAI's response shapes (serve/responses.py)."""

from __future__ import annotations

import json
import random

import pytest

from serve.generation import Reply
from serve.protocol import Job, parse_chat, parse_completion, parse_json
from serve.requests import PromptLogprobs, ServeError, TopLogprobs
from serve.responses import Responder
from serve.served_model import ServedModel, request_defaults
from serve.text import StopMatcher, TextStream

EOS = (151645, 151643)
DEFAULTS = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
CONTEXT = 64


@pytest.fixture(scope="module")
def model(tok):
    return ServedModel(
        name="tiny", vocab_size=151936, max_model_len=CONTEXT, eos_ids=EOS, defaults=DEFAULTS, tokenizer=tok
    )


def completion(body, model) -> Job:
    (job,) = parse_completion(body, model)
    return job


def chat(body, model) -> Job:
    (job,) = parse_chat(body, model)
    return job


def _refusal(parse, body, model) -> ServeError:
    with pytest.raises(ServeError) as info:
        parse(body, model)
    message = str(info.value)
    assert message and "\n" not in message
    return info.value


# ----------------------------------------------------------------------------------- defaults
def test_completion_defaults_come_from_generation_config(model, tok):
    job = completion({"model": "tiny", "prompt": "Hello world"}, model)
    r = job.request
    assert r.prompt_ids == tuple(tok.encode("Hello world")) and job.prompt_text == "Hello world"
    assert r.max_tokens == 16  # OpenAI's and vLLM's completions default
    s = r.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.seed) == (0.7, 20, 0.8, 0.0, 1.05, None)
    assert r.stop_token_ids == EOS and r.logprobs is None and r.prompt_logprobs is None
    assert not job.stream and not job.echo and job.stop == ()
    # Set fields win; the unset ones keep the checkpoint's defaults (repetition_penalty applies to greedy too).
    job = completion({"prompt": [5, 6, 7], "temperature": 0, "top_k": -1, "seed": 3, "max_tokens": 9}, model)
    s = job.request.sampling
    assert s.greedy and s.top_k == 0 and s.repetition_penalty == 1.05 and s.seed == 3
    assert job.request.prompt_ids == (5, 6, 7) and job.request.max_tokens == 9
    assert job.prompt_text == tok.decode([5, 6, 7])


def test_default_max_tokens_fits_the_context(model, tok):
    ids = list(range(1, CONTEXT - 4))  # 59 tokens
    assert completion({"prompt": ids}, model).request.max_tokens == 5  # 16 capped by the room left
    messages = [{"role": "user", "content": "Hi there"}]
    job = chat({"messages": messages}, model)
    expect = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert job.request.prompt_ids == tuple(expect)
    assert job.request.max_tokens == CONTEXT - len(expect)  # chat: the rest of the context (vLLM)
    assert chat({"messages": messages, "max_completion_tokens": 3, "max_tokens": 9}, model).request.max_tokens == 3
    capped = ServedModel(**{**model.__dict__, "defaults": {**DEFAULTS, "max_new_tokens": 4}})
    assert chat({"messages": messages}, capped).request.max_tokens == 4


def test_fields_map_onto_the_generation_request(model):
    job = completion(
        {
            "prompt": ["one prompt in a list"],
            "echo": True,
            "logprobs": 3,
            "max_tokens": 0,
            "stop": "\n\n",
            "stop_token_ids": [7],
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "user": "ignored",
            "some_future_field": {"x": 1},  # unknown fields are ignored
        },
        model,
    )
    r = job.request
    assert r.max_tokens == 0 and r.logprobs == 3 and r.prompt_logprobs == 3
    assert r.stop_token_ids == (*EOS, 7) and job.stop == ("\n\n",)
    assert job.stream and job.include_usage and job.echo and job.return_token_ids
    assert completion({"prompt": "x", "ignore_eos": True}, model).request.stop_token_ids == ()
    job = chat(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}], "logprobs": True},
        model,
    )
    assert job.logprobs == 0 and job.request.logprobs == 0 and job.request.prompt_logprobs is None
    assert (
        chat({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 5}, model).logprobs == 5
    )


def test_defaults_are_the_values_generation_config_sets(tmp_path, model):
    """As vLLM: each value the file sets, whatever its do_sample; a base model's file (greedy for HF's
    generate) leaves requests at temperature 1.0 and caps replies at its max_new_tokens."""
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048, "top_k": None})
    )
    assert request_defaults(str(tmp_path)) == {"max_new_tokens": 2048}
    base = ServedModel(**{**model.__dict__, "defaults": request_defaults(str(tmp_path))})
    s = completion({"prompt": "a"}, base).request.sampling
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ValueError, match="temperature must be a number"):
        request_defaults(str(tmp_path))
    assert request_defaults(str(tmp_path / "none")) == {}


def test_a_batch_of_prompts_is_one_job_each(model, tok):
    jobs = parse_completion({"prompt": ["Hello", [5, 6, 7], "Hi there"], "max_tokens": 3, "seed": 1}, model)
    assert [j.index for j in jobs] == [0, 1, 2]
    assert [j.prompt_ids for j in jobs] == [tuple(tok.encode("Hello")), (5, 6, 7), tuple(tok.encode("Hi there"))]
    assert all(j.request.max_tokens == 3 and j.request.sampling.seed == 1 for j in jobs)
    # each prompt's room in the context is its own
    jobs = parse_completion({"prompt": [[1] * 60, [2]]}, model)
    assert [j.request.max_tokens for j in jobs] == [4, 16]


# ----------------------------------------------------------------------------------- refusals
COMPLETION_REFUSALS = [
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({}, 400, "prompt", "required"),
    ({"prompt": 5}, 400, "prompt", "a number"),
    ({"prompt": ["a", ""]}, 400, "prompt", "prompt[1] is empty"),
    ({"prompt": [[1], [2, 151936]]}, 400, "prompt", "prompt[1][1]: token id 151936 is outside"),
    ({"prompt": [[1], 2]}, 400, "prompt", "integer token id"),
    ({"prompt": [1, 151936]}, 400, "prompt", "151936 is outside"),
    ({"prompt": [1, -1]}, 400, "prompt", "-1 is outside"),
    ({"prompt": [1, "2"]}, 400, "prompt", "integer token id"),
    ({"prompt": [1, True]}, 400, "prompt", "integer token id"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
    ({"prompt": "a", "max_tokens": 10**30}, 400, "max_tokens", "maximum context length is 64"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "max_tokens": 5.0}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_k": -2}, 400, "top_k", ">= 0"),
    ({"prompt": "a", "min_p": 2}, 400, "min_p", "[0, 1]"),
    ({"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ({"prompt": "a", "seed": 2**70}, 400, "seed", "64-bit"),
    ({"prompt": "a", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of", "best_of"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({"prompt": "a", "stop": ""}, 400, "stop", "empty"),
    ({"prompt": "a", "stop": ["x", 3]}, 400, "stop", "list of strings"),
    ({"prompt": "a", "stop_token_ids": [151936]}, 400, "stop_token_ids", "outside"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "a", "logit_bias": {"5": 1.0}}, 400, "logit_bias", "not supported"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
]


@pytest.mark.parametrize("body, status, param, text", COMPLETION_REFUSALS, ids=[r[3] for r in COMPLETION_REFUSALS])
def test_completion_refusals(model, body, status, param, text):
    error = _refusal(parse_completion, body, model)
    assert (error.status, error.param) == (status, param) and text in str(error), str(error)


CHAT_REFUSALS = [
    ({"messages": []}, "messages", "at least one"),
    ({}, "messages", "required"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"content": "hi"}]}, "messages", "messages[0].role is required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "a number"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "'image_url' is not supported"),
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs", "20"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 100}, "max_completion_tokens", "64"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
    (
        {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}},
        "response_format",
        "",
    ),
]


@pytest.mark.parametrize("body, param, text", CHAT_REFUSALS, ids=[r[2] for r in CHAT_REFUSALS])
def test_chat_refusals(model, body, param, text):
    error = _refusal(parse_chat, body, model)
    assert (error.status, error.param) == (400, param) and text in str(error), str(error)


def test_context_overflow_names_both_numbers(model):
    error = _refusal(parse_completion, {"prompt": list(range(1, 41)), "max_tokens": 30}, model)
    assert "64" in str(error) and "40 in the prompt + 30" in str(error)
    error = _refusal(parse_completion, {"prompt": list(range(1, 80))}, model)
    assert "79 tokens" in str(error) and "64" in str(error)


def test_body_must_be_a_json_object(model):
    for raw, text in ((b'{"prompt": "a"', "malformed JSON"), (b"\xff\xfe", "UTF-8"), (b"", "malformed JSON")):
        with pytest.raises(ServeError, match=text):
            parse_json(raw)
    for body in ([1, 2], "text", None):
        assert "must be a JSON object" in str(_refusal(parse_completion, body, model))


def test_without_a_tokenizer_only_token_ids_are_served(model):
    bare = ServedModel(**{**model.__dict__, "tokenizer": None})
    assert completion({"prompt": [1, 2]}, bare).prompt_text == ""
    for parse, body in ((parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": [{"role": "user"}]})):
        assert "no tokenizer" in str(_refusal(parse, body, bare))


# ----------------------------------------------------------------------------------- stop strings
def _expected(text: str, stops) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def test_stop_strings_are_held_back_and_cut_at_random():
    rng = random.Random(0)
    alphabet = "ab\nc"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        matcher = StopMatcher(stops)
        out, pos = "", 0
        while pos < len(text):
            step = rng.randint(1, 5)
            out += matcher.push(text[pos : pos + step])
            pos += step
            expect = _expected(text, stops)
            # never more than the answer, never a stop string, and no text held back without a reason
            assert expect.startswith(out)
            held = text[: min(pos, len(expect))][len(out) :]
            if matcher.stopped is None:
                assert held == "" or any(s.startswith(held[-k:]) for s in stops for k in range(1, len(held) + 1))
                assert len(held) < max(map(len, stops))
        out += matcher.flush()
        assert out == _expected(text, stops), (text, stops)
        assert (matcher.stopped is not None) == (out != text)


def test_text_stream_decodes_incrementally_with_stops(tok):
    text = "Hello 你好 🦀 world. STOP here"
    ids = tok.encode(text)
    stream = TextStream(tok, stops=["STOP"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped == "STOP"
    assert "".join(pieces) == "Hello 你好 🦀 world. " and "\ufffd" not in "".join(pieces)
    # no stop: everything, and the stop token of the engine is never text
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in ids) + stream.finish() == text
    stream = TextStream(tok, stops=["STOP HERE"])
    assert "".join(stream.push(t) for t in ids) + stream.finish() == text  # held back, then released


# ----------------------------------------------------------------------------------- responses
def test_completion_response_shapes(model, tok):
    prompt = tok.encode("Hi you")
    job = completion({"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2}, model)
    reply = Reply(
        text=" there",
        token_ids=[1052, 0],
        logprobs=[TopLogprobs(1052, -0.5, ((1052, -0.5),)), TopLogprobs(0, float("-inf"), ((5, -0.1),))],
        prompt_logprobs=PromptLogprobs((None, TopLogprobs(prompt[1], -3.0, ((9, -1.0),)))),
        finish_reason="length",
    )
    body = Responder([job], model).response([reply])
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["text"] == "Hi you there" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in [*prompt, 1052, 0]]
    assert lp["token_logprobs"] == [None, -3.0, -0.5, -9999.0]  # -inf has no JSON: vLLM's stand-in
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {tok.decode([9]): -1.0, " you": -3.0}
    assert lp["text_offset"] == [0, 2, 6, 6 + len(tok.decode([1052]))]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chat_response_and_chunk_shapes(model, tok):
    job = chat(
        {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 1, "stream": True}, model
    )
    responder = Responder([job], model)
    reply = Reply(text="ok", token_ids=[564], logprobs=[TopLogprobs(564, -1.25, ((33, -0.25),))], finish_reason="stop")
    body = responder.response([reply])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ok"}
    entry = choice["logprobs"]["content"][0]
    assert entry["token"] == tok.decode([564]) and entry["logprob"] == -1.25
    assert entry["bytes"] == list(tok.decode([564]).encode())
    assert entry["top_logprobs"] == [{"token": "B", "logprob": -0.25, "bytes": [66]}]
    first = responder.first_chunks()[0]
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert first["id"] == body["id"]
