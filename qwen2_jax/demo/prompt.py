"""The demo's prompt: the start of a docstring from the prepared corpus's held-out rows.

The corpus (`train.data_corpus`) is one section per documented name, `<qualified name>\\n\\n<docstring>`,
sections separated by blank lines. The held-out split holds rows the training run never reads. The
prompt is the first held-out section whose heading and first words are whole inside a row, cut after
its first few words, with the text that follows it in the corpus as the reference continuation.
Deterministic: the same prepared data gives the same prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

# a section start: a blank line, a dotted name alone on its line, a blank line, then prose
_SECTION = re.compile(r"\n\n([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)\n\n([A-Z][a-z]+(?: [a-z]+){%d})")


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str  # what the model is given
    reference: str  # what follows it in the held-out text
    row: int  # the held-out row it was taken from


def held_out_prompt(data_dir: str, tokenizer, *, words: int = 4, reference_chars: int = 240) -> Prompt:
    """The first held-out docstring start: `<name>\\n\\n<first `words` words>`, and the corpus text after it."""
    meta = _read_json(os.path.join(data_dir, "meta.json"))
    pattern = re.compile(_SECTION.pattern % (words - 1))
    row_index = 0
    for shard in meta["splits"]["eval"]["shards"]:
        rows = np.load(os.path.join(data_dir, shard["file"]), mmap_mode="r")
        for row in rows:
            text = tokenizer.decode([int(t) for t in row], skip_special_tokens=False)
            for match in pattern.finditer(text):
                rest = text[match.end() :]
                if "<|" not in rest[:reference_chars] and len(rest) >= reference_chars // 2:
                    prompt = f"{match.group(1)}\n\n{match.group(2)}"
                    return Prompt(prompt, rest[:reference_chars], row_index)
            row_index += 1
    raise ValueError(f"{data_dir}: no held-out row holds the start of a docstring")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
