"""Shared by the tokenizer tests: reference values, random text, and the built Qwen2 tokenizer."""

from __future__ import annotations

import functools
import random
import time
import unicodedata
from pathlib import Path

import pytest

from qwen2_jax.tokenizer import load_tokenizer
from qwen2_jax.tokenizer_build import write_qwen2_tokenizer

# Reference values are spelled out here rather than imported, so a wrong constant
# in the module cannot make the tiktoken comparison agree with itself.
# Qwen's PAT_STR (single-digit \p{N}, unlike cl100k's \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

SAMPLES = {
    "english": "Hello world! It's a test: we'll see, they're done, I'd say. DON'T SHOUT'S",
    "chinese": "你好，世界！通义千问是阿里巴巴开发的大语言模型。",
    "arabic": "مرحبا بالعالم، هذه جملة عربية للاختبار.",
    "japanese": "こんにちは世界。カタカナとひらがなと漢字を混ぜた文章です。",
    "korean": "안녕하세요 세계. 한국어 문장을 시험합니다.",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "python": (
        'def f(x: int) -> int:\n    """Doc."""\n    if x >= 10:\n\t\treturn x ** 2  # square\n'
        '    return {"k": [1, 2]}\n'
    ),
    "emoji": "I ❤️ 🦀 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇨🇳🇺🇸🇯🇵 😀😀😀",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0335\u0321\u0327a\u0336l\u0337g\u0338o \u1100\u1161\u11a8 A\u030a",
    "digits": "12345 3.14159 1,000,000 ٠١٢٣٤٥ １２３ 2024-06-07 99999999999999999999",
    "whitespace": "   leading  spaces and trailing   \u00a0nbsp\u3000ideographic\u2009thin ",
    "newlines": "line1\nline2\r\nline3\n\n\nline4\r\r\n \n  \n\t\n",
    "tabs": "\tone\t\ttwo\t \tthree\t",
    "mixed": "Qwen2 模型 supports 多语言 — العربية, русский, 日本語 & 한국어 (v1.5 → v2).",
    "symbols": "a+b=c; ≤≥≠ ∑∫ ©®™ §¶ ...!!! ??? <<<>>> /* */ ''' \"\"\" `code`",
}

# Code-point ranges of several scripts plus combining marks, numerals, spaces and
# astral planes, so the random corpus hits every branch of the split pattern.
SCRIPT_RANGES = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0x24F),  # Latin-1 + extended
    (0x300, 0x36F),  # combining diacritics
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x5FF),  # Hebrew
    (0x600, 0x6FF),  # Arabic (incl. Arabic-Indic digits)
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x1100, 0x11FF),  # Hangul jamo (composes under NFC)
    (0x2000, 0x206F),  # general punctuation, odd spaces, ZWJ
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFF00, 0xFFEF),  # fullwidth forms
    (0x1F300, 0x1FAFF),  # emoji
    (0x1D400, 0x1D7FF),  # math alphanumerics (NFC-stable, NFKC would change them)
]
WHITESPACE = [" ", "  ", "\n", "\r\n", "\t", "   ", "\n\n", "\u3000", "\u00a0"]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.2:
            pieces.append(rng.choice(WHITESPACE))
        elif roll < 0.25:
            pieces.append(rng.choice(["'s", "'LL", "'ve", "'d", "'T"]))
        else:
            lo, hi = rng.choice(SCRIPT_RANGES)
            pieces.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
    return "".join(pieces)


def random_corpus(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(count)]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@functools.cache
def _build(base: Path) -> tuple[Path, float]:
    directory = base / "qwen2_tokenizer"
    start = time.perf_counter()
    write_qwen2_tokenizer(directory)
    return directory, time.perf_counter() - start


def built_tokenizer(tmp_path_factory) -> tuple[Path, float]:
    """(directory, seconds the build took) of the Qwen2 tokenizer written once per test session (the
    tokenizer test modules' session fixtures all call this, so it is built once, not once a module)."""
    return _build(tmp_path_factory.getbasetemp())


@functools.cache
def loaded_tokenizer(directory: Path):
    return load_tokenizer(directory)


def hf_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


CORPUS = random_corpus(seed=1234, count=3000)
