"""qwen2-generate: text generation from a checkpoint (an HF directory or an Orbax checkpoint).

    qwen2-generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3 | --chat)
                   [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
                   [--dtype bfloat16] [--quantize int8] [--adapter PEFT_LORA_DIR]
                   [--dual-chunk-attention CHUNK,LOCAL]

Sampling defaults come from the checkpoint's generation_config.json (as HF's generate uses them);
flags override them. Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from qwen2_jax.checkpoint import load_checkpoint, require_checkpoint_dir
from qwen2_jax.cli_support import (
    ArgumentParser,
    UsageError,
    add_dual_chunk_flag,
    parse_dual_chunk,
    run_cli,
    with_dual_chunk,
)
from qwen2_jax.config import Qwen2Config
from qwen2_jax.generate import GenerateOptions, Generator
from qwen2_jax.sampling import eos_ids_of, load_generation_config, validate
from qwen2_jax.tokenizer import load_tokenizer

PROG = "qwen2-generate"
DEFAULT_MAX_NEW_TOKENS = 256


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Generate text with a Qwen2 checkpoint (HF directory or Orbax).")
    p.add_argument("--checkpoint", required=True, help="HF directory (config.json + safetensors) or Orbax checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    src.add_argument("--chat", action="store_true", help="interactive multi-turn chat (Ctrl-D to leave)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default: generation_config.json's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}",
    )
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help='print one JSON object: {"tokens": [...], "text": "..."}')
    p.add_argument("--chat-template", action="store_true", help="wrap --prompt as one user turn of the chat template")
    p.add_argument("--system", default=None, help="system message for --chat / --chat-template")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="convert the weights on load (default: keep the stored dtype)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: attention, MLP and LM-head matrices as int8, one scale per output channel "
        "(embeddings and norms keep --dtype)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), merged into "
        "the weights on load",
    )
    p.add_argument(
        "--layer-layout",
        choices=["per_layer", "stacked"],
        default="per_layer",
        help="how the decode loop holds the layer stack (default: per_layer)",
    )
    p.add_argument(
        "--allow-context-overflow",
        action="store_true",
        help="let prompt + --max-new-tokens run past the model's context (max_position_embeddings)",
    )
    add_dual_chunk_flag(p)
    p.add_argument("--quiet", action="store_true", help="no speed report on stderr")
    return p


def _parse_ids(text: str) -> list[int]:
    parts = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    try:
        return [int(t) for t in parts]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _sampling_args(args, gen: dict[str, Any]) -> dict[str, Any]:
    def pick(flag, key):
        return flag if flag is not None else gen.get(key)

    out = dict(
        temperature=pick(args.temperature, "temperature"),
        top_k=pick(args.top_k, "top_k"),
        top_p=pick(args.top_p, "top_p"),
        min_p=pick(args.min_p, "min_p"),
        repetition_penalty=pick(args.repetition_penalty, "repetition_penalty"),
    )
    if out["temperature"] is None:
        out["temperature"] = 0.0
    try:
        validate(**out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return out


class _Session:
    """Checkpoint, tokenizer and settings: loaded once, used for one prompt or a whole chat."""

    def __init__(self, args):
        self.args = args
        path = args.checkpoint
        self.dual_chunk = parse_dual_chunk(args.dual_chunk_attention)
        try:
            require_checkpoint_dir(path, config_hint=" (not an HF or Orbax checkpoint)")
            self.config = with_dual_chunk(Qwen2Config.from_hf(path), self.dual_chunk)
            self.gen = load_generation_config(path)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError and ConfigError are ValueErrors
            raise UsageError(str(e)) from None
        self.sampling = _sampling_args(args, self.gen)
        self.max_new_tokens = (
            args.max_new_tokens
            if args.max_new_tokens is not None
            else self.gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        )
        if self.max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        self.eos = eos_ids_of(self.config, self.gen)
        self.tokenizer = None
        if args.prompt is not None or args.chat or self._has_tokenizer():
            self.tokenizer = self._load_tokenizer(required=args.prompt is not None or args.chat)
        self.params = None

    def _has_tokenizer(self) -> bool:
        return os.path.exists(os.path.join(self.args.checkpoint, "tokenizer.json"))

    def _load_tokenizer(self, required: bool):
        if not self._has_tokenizer():
            if required:
                raise UsageError(
                    f"{self.args.checkpoint} has no tokenizer.json: use --prompt-ids, or add the "
                    "tokenizer files (qwen2_jax.tokenizer_build.write_qwen2_tokenizer)"
                )
            return None
        try:
            return load_tokenizer(self.args.checkpoint)
        except (OSError, ValueError) as e:
            if required:
                raise UsageError(f"cannot load the tokenizer: {e}") from None
            return None

    def check_prompt(self, ids: Sequence[int], what: str = "prompt") -> None:
        if not ids:
            raise UsageError(f"the {what} is empty (0 tokens)")
        context = self.config.context_length  # None: no limit (dual chunk attention)
        if context is not None and len(ids) > context:
            raise UsageError(f"the {what} has {len(ids)} tokens, more than the model's context of {context} tokens")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the model's vocabulary [0, {self.config.vocab_size})")
        if context is not None and len(ids) + self.max_new_tokens > context and not self.args.allow_context_overflow:
            raise UsageError(
                f"the {what} ({len(ids)} tokens) + --max-new-tokens {self.max_new_tokens} runs past the "
                f"model's context of {context} tokens (max_position_embeddings); lower "
                "--max-new-tokens or pass --allow-context-overflow"
            )

    def load_params(self):
        if self.params is None:
            try:
                config, params = load_checkpoint(
                    self.args.checkpoint, dtype=self.args.dtype, quantize=self.args.quantize, adapter=self.args.adapter
                )
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
            except ValueError as e:  # CheckpointError, ConfigError: a malformed checkpoint
                raise UsageError(str(e)) from None
            self.config = config = with_dual_chunk(config, self.dual_chunk)
            # consume: the checkpoint params move into the generator (peak memory: model + one leaf)
            self.params = Generator(config, params, layer_layout=self.args.layer_layout, consume=True)
        return self.params

    def text_of(self, tokens: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        tokens = list(tokens)
        if tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        return self.tokenizer.decode(self._known(tokens), skip_special_tokens=True)

    def _known(self, tokens):
        # The model's padded vocabulary is larger than the tokenizer's: those ids have no text.
        size = self.tokenizer.vocab_size
        return [t for t in tokens if t < size]

    def generate(self, ids: list[int], seed: int) -> list[int]:
        return self.load_params().generate([ids], self.request(seed))[0]

    def request(self, seed: int):
        return GenerateOptions(
            self.max_new_tokens,
            seed=seed,
            eos_token_ids=self.eos,
            allow_context_overflow=self.args.allow_context_overflow,
            **self.sampling,
        )

    def stream(self, ids: list[int], seed: int, out) -> list[int]:
        """Generate, writing text to `out` as tokens are made; return the tokens."""
        generator = self.load_params()
        decoder = self.tokenizer.decode_stream(skip_special_tokens=True) if self.tokenizer else None
        tokens: list[int] = []
        start = time.perf_counter()
        first = None
        for column in generator.stream([ids], self.request(seed)):
            if column[0] is None:
                break
            tokens.append(column[0])
            if first is None:
                first = time.perf_counter()
            if decoder is not None:
                if tokens[-1] in self.eos:
                    continue
                out.write(decoder.update(self._known(tokens)))
            else:
                out.write(f"{tokens[-1]} ")
            out.flush()
        if decoder is not None:
            out.write(decoder.flush())
        out.write("\n")
        out.flush()
        end = time.perf_counter()
        if not self.args.quiet and tokens:
            rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else float("nan")
            print(
                f"[{len(tokens)} tokens; first after {first - start:.2f}s; then {rate:.2f} tok/s]",
                file=sys.stderr,
                flush=True,
            )
        return tokens


def _prompt_ids(session: _Session, args) -> list[int]:
    if args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids)
    else:
        text = args.prompt
        if args.chat_template:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            text = session.tokenizer.apply_chat_template(
                messages + [{"role": "user", "content": text}], add_generation_prompt=True
            )
        ids = session.tokenizer.encode(text)
    session.check_prompt(ids)
    return ids


def _run_prompt(session: _Session, args) -> int:
    ids = _prompt_ids(session, args)
    if args.json:
        tokens = session.generate(ids, args.seed)
        stopped = bool(tokens) and tokens[-1] in session.eos
        print(
            json.dumps(
                {
                    "tokens": tokens,
                    "text": session.text_of(tokens),
                    "prompt_tokens": len(ids),
                    "finish_reason": "stop" if stopped else "length",
                },
                ensure_ascii=False,
            )
        )
    else:
        session.stream(ids, args.seed, sys.stdout)
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _run_chat(session: _Session, args) -> int:
    tok = session.tokenizer
    if tok.eos_token_id is not None and tok.eos_token_id not in session.eos:
        session.eos = session.eos + [tok.eos_token_id]  # always end a turn at the template's end token
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("Chat: type a message, Enter to send, Ctrl-D to leave.", file=sys.stderr)
    session.load_params()
    turn = 0
    while True:
        line = _read_line(interactive)
        if line is None:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        # Keep prompt + reply within the context: drop the oldest exchanges (a system message stays).
        context = session.config.context_length
        if context is None:  # dual chunk attention: no position limit
            budget = len(ids)
        else:
            budget = context if args.allow_context_overflow else max(1, context - session.max_new_tokens)
        while len(ids) > budget and len(history) > 1 + bool(args.system):
            del history[int(bool(args.system))]
            ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        if len(ids) > budget:
            print(
                f"{PROG}: message too long ({len(ids)} tokens; context {context}, "
                f"--max-new-tokens {session.max_new_tokens})",
                file=sys.stderr,
            )
            history.pop()
            continue
        try:
            tokens = session.stream(ids, args.seed + turn, sys.stdout)
        except KeyboardInterrupt:
            print(file=sys.stdout)
            history.pop()
            continue
        history.append({"role": "assistant", "content": session.text_of(tokens) or ""})
        turn += 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    session = _Session(args)
    return _run_chat(session, args) if args.chat else _run_prompt(session, args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
