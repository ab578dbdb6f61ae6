"""Fake CPU devices for sharding tests and the persistent compilation cache (tests/xla_env.py): set before
jax is imported anywhere."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xla_env import set_session_environment  # noqa: E402  (before jax is imported anywhere)

set_session_environment(devices=8)


# The built Qwen2 tokenizer, shared by the tokenizer tests (built once per session).
@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    from tokenizer_utils import built_tokenizer  # after the device flags above are set

    return built_tokenizer(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def tok(tok_dir):
    from tokenizer_utils import loaded_tokenizer

    return loaded_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    from tokenizer_utils import hf_tokenizer

    return hf_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def corpus():
    from tokenizer_utils import CORPUS

    return CORPUS


# The training-data tests' corpus of random documents and its prepared shards (built once per session).
@pytest.fixture(scope="session")
def reference_tokenizer(tok_dir):
    from train_data_utils import reference_tokenizer

    return reference_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory):
    from train_data_utils import make_corpus

    return make_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def prepared(data_corpus, tok_dir, tmp_path_factory):
    from train_data_utils import prepare_corpus

    return prepare_corpus(data_corpus, tok_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory, hf_tok):
    """A random tiny Qwen2 in an HF directory, with every parameter random and Qwen2's tokenizer: the
    checkpoint the SFT, DPO and LoRA command-line tests start from (read, never written; built once)."""
    from hf_utils import save_tiny_chat_model

    path = tmp_path_factory.mktemp("tiny-hf")
    save_tiny_chat_model(path, hf_tok, tie_word_embeddings=True)
    return str(path)


# The modules whose tests start training or serving processes (tens of seconds each, cold) run first, so
# the two xdist workers do not end with one of them alone on a long subprocess test while the other idles:
# in name order they came last (test_train_*). Measured on a cold cache, 2 cores: the suite's last 10% took
# over 3 minutes in name order.
SUBPROCESS_HEAVY = (
    "test_train_multiprocess.py",
    "test_train_cli.py",
    "test_train_dpo_cli.py",
    "test_train_sft_cli.py",
    "test_train_lora_cli.py",
    "test_serve_http.py",
    "test_train_upcycle.py",
    "test_train_loop.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SUBPROCESS_HEAVY)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: name order otherwise
