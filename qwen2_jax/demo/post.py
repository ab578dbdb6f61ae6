"""`make demo-post` / `python -m qwen2_jax.demo.post`: the post-training path on the demo's tiny model.

The base demo's model (`python -m qwen2_jax.demo`, pretrained on the `decimal` module's docstrings)
learns to answer "What does `decimal.X` do?" with the first sentence of X's docstring:

  base      the base demo's checkpoint: reused from `--base DIR` (what `python -m qwen2_jax.demo --keep
            DIR` wrote), or trained first through the base demo's own stages (tokenizer, corpus, train)
  data      ~125 names split into ~100 trained on and ~25 held out; SFT rows (question, true answer)
            and DPO rows (true answer chosen, the answer of another kind of name rejected) for the
            trained names only
  before    held-out preference accuracy of the base model
  sft       `qwen2-train` task sft from the base checkpoint, then the held-out accuracy
  dpo       `qwen2-train` task dpo from the SFT checkpoint (the reference), then the held-out accuracy
  chat      `qwen2-generate --chat` answering a held-out question

Held-out preference accuracy: the share of held-out pairs with log πθ(chosen) > log πθ(rejected).
The demo fails (exit status 1) unless it ends at MIN_ACCURACY or above.

    python -m qwen2_jax.demo.post [--base DIR] [--keep DIR] [--sft-steps N] [--dpo-steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import resources

from qwen2_jax.demo import qa_pairs
from qwen2_jax.demo.stages import StageFailed, Stages, run_command

MIN_ACCURACY = 0.8  # held-out preference accuracy after DPO
CHAT_NEW_TOKENS = 40
BASE_STAGES = ("tokenizer", "corpus", "train")  # the base demo's stages that produce its checkpoint
POST_STAGES = ("data", "before", "sft", "dpo", "chat")


def recipe_path(name: str) -> str:
    """A post-training recipe as shipped in the package (sft.yaml, dpo.yaml)."""
    return str(resources.files("qwen2_jax.demo") / name)


def base_checkpoint(base_dir: str) -> str:
    return os.path.join(base_dir, "run", "checkpoints")


def has_base(base_dir: str) -> bool:
    """Whether `base_dir` holds a finished base demo run (its checkpoint and the tokenizer beside it)."""
    return os.path.isfile(os.path.join(base_checkpoint(base_dir), "tokenizer.json"))


class PostDemo:
    def __init__(self, directory: str, base_dir: str, args):
        self.dir = directory
        self.base_dir = base_dir
        self.args = args
        self.reuse_base = has_base(base_dir)
        count = (1 if self.reuse_base else len(BASE_STAGES)) + len(POST_STAGES)
        self.stages = Stages(count)
        self.data_dir = os.path.join(directory, "post-data")
        self.sft_dir = os.path.join(directory, "sft")
        self.dpo_dir = os.path.join(directory, "dpo")
        self.accuracies: list[tuple[str, object]] = []
        self.held_out_pairs: list[tuple[str, str, str]] = []
        self.chat_exchange: qa_pairs.Exchange | None = None

    def say(self, text: str = "") -> None:
        self.stages.say(text)

    def run(self) -> None:
        self.base()
        self.data()
        self.before()
        self.sft()
        self.dpo()
        self.chat()
        self.say("\nheld-out preference accuracy (log πθ(chosen) > log πθ(rejected), names never post-trained on):")
        for when, accuracy in self.accuracies:
            self.say(f"    {when:<10} {accuracy}")
        self.say(f"\ndemo-post: done in {self.stages.summary()}")

    # --------------------------------------------------------------------------------- stages
    def base(self):
        if self.reuse_base:
            with self.stages.stage("base", "the base demo's checkpoint, reused") as st:
                self.say(f"reusing {base_checkpoint(self.base_dir)} (written by python -m qwen2_jax.demo --keep)")
                st.wrote()
            return
        from qwen2_jax.demo.pipeline import Demo

        self.say(f"no base demo run in {self.base_dir}: training it first (python -m qwen2_jax.demo's stages 1-3)")
        demo = Demo(self.base_dir, self.args.base_steps, self.args.seed)
        demo.stages = self.stages  # one numbering for the whole run
        demo.tokenizer()
        demo.corpus()
        demo.train()

    def data(self):
        what = "questions about the decimal module answered by docstrings; names split into trained and held out"
        with self.stages.stage("data", what) as st:
            os.makedirs(self.data_dir, exist_ok=True)
            split = qa_pairs.split(qa_pairs.decimal_exchanges())
            sft_rows = os.path.join(self.data_dir, "sft.jsonl")
            dpo_rows = os.path.join(self.data_dir, "dpo.jsonl")
            held_rows = os.path.join(self.data_dir, "held_out.jsonl")
            qa_pairs.write_jsonl(sft_rows, map(qa_pairs.chat_row, split.train))
            qa_pairs.write_jsonl(
                dpo_rows, (qa_pairs.preference_row(e, r) for e, r in qa_pairs.preference_pairs(split.train))
            )
            held = qa_pairs.preference_pairs(split.held_out)
            qa_pairs.write_jsonl(held_rows, (qa_pairs.preference_row(e, r) for e, r in held))
            self.held_out_pairs = [(e.question, e.answer, r) for e, r in held]
            self.chat_exchange = split.held_out[len(split.held_out) // 2]
            self.say(f"{len(split.train)} names trained on, {len(split.held_out)} held out; an SFT row:")
            self.say("    " + json.dumps(qa_pairs.chat_row(split.train[0]), ensure_ascii=False))
            example, rejected = held[0]
            self.say("a held-out pair:")
            self.say(f"    user:     {example.question}")
            self.say(f"    chosen:   {example.answer}")
            self.say(f"    rejected: {rejected}")
            st.wrote(sft_rows, dpo_rows, held_rows)

    def before(self):
        with self.stages.stage("before", "held-out preference accuracy of the base model"):
            self._accuracy("base", base_checkpoint(self.base_dir))

    def sft(self):
        with self.stages.stage("sft", "qwen2-train task sft from the base checkpoint") as st:
            self._train("sft.yaml", base_checkpoint(self.base_dir), self.sft_dir, "sft.jsonl", self.args.sft_steps)
            checkpoint = os.path.join(self.sft_dir, "checkpoints")
            # A chat model's turns end at <|im_end|>: the tokenizer says so, so that `qwen2-generate --chat`
            # stops there (the base model's tokenizer ends documents at <|endoftext|>).
            from qwen2_jax.tokenizer_build import IM_END, write_qwen2_tokenizer

            write_qwen2_tokenizer(checkpoint, eos_token=IM_END)
            self._accuracy("after SFT", checkpoint)
            st.wrote(checkpoint, os.path.join(self.sft_dir, "metrics.jsonl"))

    def dpo(self):
        with self.stages.stage("dpo", "qwen2-train task dpo from the SFT checkpoint (also the reference)") as st:
            start = os.path.join(self.sft_dir, "checkpoints")
            self._train("dpo.yaml", start, self.dpo_dir, "dpo.jsonl", self.args.dpo_steps)
            checkpoint = os.path.join(self.dpo_dir, "checkpoints")
            accuracy = self._accuracy("after DPO", checkpoint)
            st.wrote(checkpoint, os.path.join(self.dpo_dir, "metrics.jsonl"))
            if accuracy.value < MIN_ACCURACY:
                raise StageFailed(
                    f"held-out preference accuracy after DPO is {accuracy.value:.2f}, below {MIN_ACCURACY}"
                )

    def chat(self):
        exchange = self.chat_exchange
        with self.stages.stage("chat", "qwen2-generate --chat answers a held-out question (greedy)"):
            args = ["--checkpoint", os.path.join(self.dpo_dir, "checkpoints"), "--chat", "--temperature", "0"]
            args += ["--max-new-tokens", str(CHAT_NEW_TOKENS), "--quiet"]
            reply = run_command(self.stages, "qwen2-generate", args, capture=True, stdin=exchange.question + "\n")
            self.say(f"user:      {exchange.question}")
            self.say(f"assistant: {reply.strip()}")
            self.say(f"docstring: {exchange.answer}")

    # --------------------------------------------------------------------------------- helpers
    def _train(self, recipe: str, start: str, output_dir: str, rows: str, steps: int | None) -> None:
        args = ["--config", recipe_path(recipe)]
        settings = {
            "model": start,
            "output_dir": output_dir,
            "data.sources": [os.path.join(self.data_dir, rows)],
            "seed": self.args.seed,
        }
        if steps is not None:
            settings.update(total_steps=steps, checkpoint_every=steps, log_every=max(1, steps // 6))
        for key, value in settings.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        run_command(self.stages, "qwen2-train", args)

    def _accuracy(self, when: str, checkpoint: str):
        from qwen2_jax.demo.preference_eval import preference_accuracy

        accuracy = preference_accuracy(checkpoint, self.held_out_pairs)
        self.accuracies.append((when, accuracy))
        self.say(f"held-out preference accuracy, {when}: {accuracy}")
        return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen2_jax.demo.post",
        description="SFT then DPO the demo's tiny Qwen2 on questions about the decimal module, then chat with it.",
    )
    parser.add_argument(
        "--base",
        metavar="DIR",
        help="the base demo's directory (python -m qwen2_jax.demo --keep DIR): reused when it holds a finished run, "
        "else the base model is trained there first and kept (default: trained in the working directory)",
    )
    parser.add_argument("--keep", metavar="DIR", help="write everything under DIR (new or empty) and keep it")
    parser.add_argument("--base-steps", type=int, default=None, help="base training steps when it is trained here")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: sft.yaml's)")
    parser.add_argument("--dpo-steps", type=int, default=None, help="DPO steps (default: dpo.yaml's)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    args = parser.parse_args(argv)
    if args.base and not has_base(args.base) and os.path.isdir(args.base) and os.listdir(args.base):
        print(f"demo-post: error: --base {args.base} holds no finished demo run and is not empty", file=sys.stderr)
        return 2
    if args.keep:
        if os.path.isdir(args.keep) and os.listdir(args.keep):
            print(f"demo-post: error: --keep {args.keep} is not empty (give a new or empty directory)", file=sys.stderr)
            return 2
        os.makedirs(args.keep, exist_ok=True)
        return _run(os.path.abspath(args.keep), args)
    directory = tempfile.mkdtemp(prefix="qwen2-jax-demo-post-")
    try:
        return _run(directory, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(directory: str, args) -> int:
    base_dir = os.path.abspath(args.base) if args.base else os.path.join(directory, "base")
    print(f"demo-post: working in {directory}" + ("" if args.keep else " (removed at the end; --keep DIR keeps it)"))
    demo = PostDemo(directory, base_dir, args)
    try:
        demo.run()
    except StageFailed as e:
        print(f"\ndemo-post: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo-post: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
