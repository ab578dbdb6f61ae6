"""The training data pipeline, in one import.

    from train.data import (prepare, ensure_prepared, default_corpus_sources,
                            make_train_iterator, make_eval_iterator, PackedTokenSource, prepare_main)

Preparing: `train.data_prepare` (text/JSONL -> packed token shards), `train.data_corpus` (the
default corpus from the Python standard library's documentation), `train.data_cli` (the
`qwen2-train prepare` command). Reading: `train.data_loader` (grain data source, training stream
with exact and elastic resume, held-out batches). Layout on disk: `train.data_format`.
"""

from train.data_cli import prepare_main
from train.data_corpus import default_corpus_name, default_corpus_sources
from train.data_format import read_meta
from train.data_loader import EvalBatches, PackedTokenSource, TrainBatches, make_eval_iterator, make_train_iterator
from train.data_prepare import DEFAULT_EVAL_FRACTION, ensure_prepared, prepare

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "EvalBatches",
    "PackedTokenSource",
    "TrainBatches",
    "default_corpus_name",
    "default_corpus_sources",
    "ensure_prepared",
    "make_eval_iterator",
    "make_train_iterator",
    "prepare",
    "prepare_main",
    "read_meta",
]
