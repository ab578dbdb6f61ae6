"""Fake CPU devices for sharding tests: set before jax is imported anywhere."""

import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
