"""SFT rows -> token ids and loss labels (train/chat_render.py): the ids are the chat template's, and the
trained tokens are exactly those transformers marks with `return_assistant_tokens_mask=True` when the
same template carries `{% generation %}` around each assistant turn's content and `<|im_end|>`. Against
TRL's SFTTrainer itself (its dataset preparation, its training variant of Qwen2.5's template) the only
difference is the newlines around each turn that TRL also trains; plain-text prompt-completion rows are
equal. Then prompt-completion rows, assistant_only false, the ChatML fallback, and bad rows."""

from __future__ import annotations

import copy
import importlib.resources

import numpy as np
import pytest

from qwen2_jax.tokenizer import Qwen2Tokenizer
from qwen2_jax.tokenizer_build import QWEN2_CHAT_TEMPLATE
from train.chat_render import ChatDataError, ChatRenderer
from train.packing import IGNORE_INDEX

# Qwen2's ChatML with generation markers around what we train: the assistant content and <|im_end|>.
QWEN2_MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "What does decimal.Context.quantize do?"},
        {"role": "assistant", "content": "It rounds."},
    ],
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a loop.\n\n```python\nfor i in range(3):\n    print(i)\n```"},
        {"role": "assistant", "content": "for i in range(3):\n    print(i)\n"},
        {"role": "user", "content": "谢谢 🙏"},
        {"role": "assistant", "content": "不客气 😀 — you're welcome."},
    ],
    [
        {"role": "user", "content": "  leading spaces"},
        {"role": "assistant", "content": "\n\nstarts with blank lines and ends with spaces   "},
        {"role": "user", "content": "tabs\t\tand\r\nCRLF"},
        {"role": "assistant", "content": " 12345 ٠١٢ ≤≥ `code`"},
    ],
]


def _renderer(tok, template=None, assistant_only=True):
    config = tok.config if template is None else dict(tok.config, chat_template=template)
    return ChatRenderer(Qwen2Tokenizer(tok.backend, config), assistant_only=assistant_only)


def _hf_mask(hf_tok, messages, template):
    out = hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_assistant_tokens_equal_transformers_mask(tok, hf_tok, index):
    messages = CONVERSATIONS[index]
    assert hf_tok.apply_chat_template(messages, chat_template=QWEN2_MARKED_TEMPLATE, tokenize=False) == (
        hf_tok.apply_chat_template(messages, chat_template=QWEN2_CHAT_TEMPLATE, tokenize=False)
    )  # the markers change nothing but the mask
    doc = _renderer(tok).document({"messages": messages}, "x.jsonl:1")
    hf_ids, hf_mask = _hf_mask(hf_tok, messages, QWEN2_MARKED_TEMPLATE)
    assert doc.input_ids.tolist() == hf_ids
    trained = doc.labels != IGNORE_INDEX
    np.testing.assert_array_equal(trained, hf_mask)
    np.testing.assert_array_equal(doc.labels[trained], doc.input_ids[trained])
    # every assistant turn's end token is trained, every other <|im_end|> is not
    im_end = tok.backend.token_to_id("<|im_end|>")
    ends = np.flatnonzero(doc.input_ids == im_end)
    assistant_turns = sum(m["role"] == "assistant" for m in messages)
    assert trained[ends].sum() == assistant_turns and len(ends) == assistant_turns + sum(
        m["role"] != "assistant" for m in messages
    ) + (messages[0]["role"] != "system")


def _trl_labels(hf_tok, rows, template, **config):
    """The labels TRL's SFTTrainer builds for `rows` (its own dataset preparation, on a tiny model)."""
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = copy.deepcopy(hf_tok)
    tokenizer.chat_template = template
    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=151680, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    )
    args = SFTConfig(output_dir=None, report_to=[], use_cpu=True, max_length=None, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [(ex["input_ids"], np.asarray(ex["labels"]) != IGNORE_INDEX) for ex in trainer.train_dataset]


@pytest.mark.slow
def test_against_trl_sft_trainer_masks(tok, hf_tok):
    """Slow (TRL's trainer set-up): the same masks are checked against transformers' own
    assistant mask by test_assistant_tokens_equal_transformers_mask. TRL's SFTTrainer (its own dataset
    preparation, assistant_only_loss with its training variant of
    Qwen2.5's template; completion-only loss for prompt-completion rows) trains what we train, plus,
    in chat rows, the template's newline before each assistant turn and the one after its <|im_end|>
    (TRL's prompt-completion: the one after). Plain-text prompt-completion rows: exactly equal."""
    pytest.importorskip("trl")
    original = (importlib.resources.files("trl") / "chat_templates" / "qwen2_5.jinja").read_text()
    renderer = _renderer(tok, original)
    (newline,) = tok.encode("\n")
    chats = [{"messages": m} for m in CONVERSATIONS]
    completions = [{"prompt": m[:-1], "completion": m[-1:]} for m in CONVERSATIONS]
    texts = [{"prompt": "The capital of France is", "completion": " Paris."}, {"prompt": "1+1=", "completion": "2"}]
    for rows, extra_per_turn, config in (
        (chats, 2, {"assistant_only_loss": True}),
        (completions, 1, {}),
        (texts, 0, {}),
    ):
        for row, (trl_ids, trl_trained) in zip(rows, _trl_labels(hf_tok, rows, original, **config)):
            doc = renderer.document(row, "x.jsonl:1")
            assert doc.input_ids.tolist() == trl_ids
            ours = doc.labels != IGNORE_INDEX
            assert not np.any(ours & ~trl_trained)
            trained_messages = row.get("messages") or (row["completion"] if isinstance(row["completion"], list) else [])
            turns = sum(m["role"] == "assistant" for m in trained_messages)
            extra = doc.input_ids[trl_trained & ~ours].tolist()
            assert set(extra) <= {newline}
            # an answer that opens with newlines merges TRL's newline into its first token, which we train too
            opens_with_newline = any(m["role"] == "assistant" and m["content"][:1] == "\n" for m in trained_messages)
            assert len(extra) == extra_per_turn * turns - (opens_with_newline and extra_per_turn == 2)


def test_conversational_prompt_completion_trains_the_completion_only(tok):
    messages = CONVERSATIONS[1]
    renderer = _renderer(tok)
    whole = renderer.document({"messages": messages}, "x.jsonl:1")
    split = renderer.document({"prompt": messages[:4], "completion": messages[4:]}, "x.jsonl:2")
    assert split.input_ids.tolist() == whole.input_ids.tolist()
    trained_whole, trained_split = whole.labels != IGNORE_INDEX, split.labels != IGNORE_INDEX
    assert not np.any(trained_split & ~trained_whole)
    first_turn = renderer.tokenizer.encode(messages[2]["content"])
    assert trained_whole.sum() - trained_split.sum() == len(first_turn) + 1  # the prompt's turn + <|im_end|>


def test_text_prompt_completion_appends_eos_and_trains_the_completion(tok):
    renderer = _renderer(tok)  # the built tokenizer's EOS is <|im_end|>
    doc = renderer.document({"prompt": "The capital of France is", "completion": " Paris."}, "x.jsonl:1")
    eos = renderer.tokenizer.eos_token_id
    assert doc.input_ids.tolist() == tok.encode("The capital of France is Paris.") + [eos]
    trained = doc.input_ids[doc.labels != IGNORE_INDEX]
    assert trained.tolist() == tok.encode(" Paris.") + [eos]


def test_assistant_only_false_trains_every_token(tok):
    doc = _renderer(tok, assistant_only=False).document({"messages": CONVERSATIONS[0]}, "x.jsonl:1")
    np.testing.assert_array_equal(doc.labels, doc.input_ids)


def test_checkpoint_without_template_gets_qwen2_chatml(tok):
    config = {k: v for k, v in tok.config.items() if k != "chat_template"}
    renderer = ChatRenderer(Qwen2Tokenizer(tok.backend, config))
    assert renderer.template.is_fallback
    doc = renderer.document({"messages": CONVERSATIONS[0]}, "x.jsonl:1")
    assert doc.input_ids.tolist() == _renderer(tok).document({"messages": CONVERSATIONS[0]}, "y").input_ids.tolist()


@pytest.mark.parametrize(
    "row,message",
    [
        ({"text": "hi"}, "x.jsonl:7: no 'messages' or 'prompt' field (found: text)"),
        ([1, 2], "x.jsonl:7: a row must be a JSON object, got list"),
        ({"messages": []}, "x.jsonl:7: messages: empty"),
        ({"messages": "hi"}, "x.jsonl:7: messages: must be a list of messages, got str"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "x.jsonl:7: messages[1].role: 'bot' is not a role the chat template knows",
        ),
        ({"messages": [{"content": "a"}]}, "x.jsonl:7: messages[0].role: missing"),
        ({"messages": [{"role": "user"}]}, "x.jsonl:7: messages[0].content: missing"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]},
            "x.jsonl:7: messages[1].content: an empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "x.jsonl:7: messages: no assistant turn to learn from"),
        (
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
            "x.jsonl:7: completion: no assistant turn to learn from",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            "x.jsonl:7: messages[0].role: a conversation cannot open with an assistant turn",
        ),
        ({"prompt": [], "completion": [{"role": "assistant", "content": "b"}]}, "x.jsonl:7: prompt: empty"),
        ({"prompt": "a"}, "x.jsonl:7: completion: missing"),
        ({"prompt": "a", "completion": ""}, "x.jsonl:7: completion: empty"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "x.jsonl:7: prompt, completion"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
            "x.jsonl:7: messages[0].content: must be a string, got int",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tok, row, message):
    with pytest.raises(ChatDataError) as info:
        _renderer(tok).document(row, "x.jsonl:7")
    assert str(info.value).startswith(message), str(info.value)


def test_a_template_that_raises_is_reported_with_the_row(tok):
    strict = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    strict += "{{ m['content'] }}{% endfor %}"
    row = {"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ChatDataError, match=r"^x.jsonl:3: messages: the chat template refuses it: .*no tools"):
        _renderer(tok, strict).document(row, "x.jsonl:3")
