"""Replies in OpenAI's shapes: whole responses, stream chunks, usage, and both logprobs formats
(completions: `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`; chat: `content` entries
with `token`, `logprob`, `bytes`, `top_logprobs`).

A `Responder` builds one request's bodies (one id and `created` in all of them); each of its jobs (a
prompt of a completion batch, or the chat) has a `ChoiceWriter` for its choice.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from serve.generation import Delta, Reply
from serve.protocol import Job
from serve.requests import TopLogprobs
from serve.served_model import ServedModel

MIN_LOGPROB = -9999.0  # JSON has no -inf: vLLM's stand-in for an impossible token


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if math.isfinite(value) else MIN_LOGPROB


class Responder:
    def __init__(self, jobs: list[Job], model: ServedModel):
        self.jobs = jobs
        self.model = model
        self.chat = jobs[0].kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.choices = [ChoiceWriter(job, model) for job in jobs]

    def response(self, replies: list[Reply]) -> dict[str, Any]:
        body = self._envelope(self.object, [w.choice(r) for w, r in zip(self.choices, replies)])
        body["usage"] = self.usage(sum(len(r.token_ids) for r in replies))
        if self.chat and self.jobs[0].return_token_ids:
            body["prompt_token_ids"] = list(self.jobs[0].prompt_ids)
        return body

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def first_chunks(self) -> list[dict[str, Any]]:
        """What a chat stream starts with: the assistant role."""
        if not self.chat:
            return []
        return [
            self._chunk({"index": w.job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None})
            for w in self.choices
        ]

    def chunk(self, i: int, delta: Delta) -> dict[str, Any] | None:
        """Job i's chunk for one delta, or None when it brings nothing to send (text held back)."""
        choice = self.choices[i].chunk_choice(delta)
        return None if choice is None else self._chunk(choice)

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope(self.object + ".chunk" if self.chat else self.object, [])
        body["usage"] = self.usage(completion_tokens)
        return body

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        choice.setdefault("finish_reason", None)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model.name, "choices": choices}


class ChoiceWriter:
    """One job's choice: whole, or chunk by chunk (it remembers what a stream has sent)."""

    def __init__(self, job: Job, model: ServedModel):
        self.job = job
        self.model = model
        self.chat = job.kind == "chat"
        self._echo_pending = job.echo and not self.chat  # a stream sends the echoed prompt once, first
        self._text_offset = 0  # a stream's completion logprobs: where the next token's text starts

    def choice(self, reply: Reply) -> dict[str, Any]:
        job = self.job
        choice: dict[str, Any] = {"index": job.index}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": reply.text}
            choice["logprobs"] = self._chat_logprobs(reply.logprobs) if job.logprobs is not None else None
        else:
            choice["text"] = (job.prompt_text if job.echo else "") + reply.text
            choice["logprobs"] = self._completion_logprobs(reply) if job.logprobs is not None else None
        choice["finish_reason"] = reply.finish_reason
        choice["stop_reason"] = reply.stop_reason
        if job.return_token_ids:
            choice["token_ids"] = list(reply.token_ids)
            if not self.chat:
                choice["prompt_token_ids"] = list(job.prompt_ids)
        return choice

    def chunk_choice(self, delta: Delta) -> dict[str, Any] | None:
        job = self.job
        text = delta.text
        echo = ""
        if self._echo_pending:  # the first delta: with logprobs, the prompt's (the scheduler sends those first)
            echo, self._echo_pending = job.prompt_text, False
        carries_tokens = bool(delta.token_ids) and (job.logprobs is not None or job.return_token_ids)
        if not (text or echo or carries_tokens or delta.prompt_logprobs or delta.finish_reason):
            return None
        choice: dict[str, Any] = {"index": job.index}
        if self.chat:
            choice["delta"] = {"content": text} if text or delta.finish_reason is None else {}
            choice["logprobs"] = self._chat_logprobs(delta.logprobs) if job.logprobs is not None else None
        else:
            choice["text"] = echo + text
            choice["logprobs"] = None
            if job.logprobs is not None:
                reply = Reply(text=text, logprobs=delta.logprobs, prompt_logprobs=delta.prompt_logprobs)
                choice["logprobs"] = self._completion_logprobs(reply, offset=self._text_offset)
        choice["finish_reason"] = delta.finish_reason
        choice["stop_reason"] = delta.stop_reason
        if job.return_token_ids:
            choice["token_ids"] = list(delta.token_ids)
        return choice

    # ------------------------------------------------------------------------------- logprobs
    def token_str(self, token_id: int) -> str:
        tok = self.model.tokenizer
        if self.job.tokens_as_ids or tok is None:
            return f"token_id:{token_id}"
        return tok.decode([token_id])

    def _token_bytes(self, token_id: int) -> list[int] | None:
        tok = self.model.tokenizer
        return list(tok.ids_to_bytes([token_id])) if tok is not None else None

    def _chat_logprobs(self, entries: list[TopLogprobs]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            return {
                "token": self.token_str(token_id),
                "logprob": _logprob(logprob),
                "bytes": self._token_bytes(token_id),
            }

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
            ]
        }

    def _completion_logprobs(self, reply: Reply, offset: int | None = None) -> dict[str, Any]:
        """OpenAI's legacy shape; with echo the prompt's tokens come first (the first has no logprob).
        Each position's top_logprobs holds its token and the k most likely, as vLLM's does."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        at = 0 if offset is None else offset
        entries: list[TopLogprobs | None] = []
        ids: list[int] = []
        if self.job.echo and reply.prompt_logprobs is not None:
            entries += list(reply.prompt_logprobs.entries)
            ids += list(self.job.prompt_ids)
        entries += list(reply.logprobs)
        ids += [e.token_id for e in reply.logprobs]
        for token_id, entry in zip(ids, entries):
            text = self.token_str(token_id)
            tokens.append(text)
            offsets.append(at)
            at += len(text)
            if entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            token_logprobs.append(_logprob(entry.logprob))
            top = {self.token_str(t): _logprob(lp) for t, lp in entry.top}
            top.setdefault(text, _logprob(entry.logprob))
            tops.append(top)
        if offset is not None:
            self._text_offset = at
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
