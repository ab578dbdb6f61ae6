"""A malformed HF directory is refused with an error naming the file or tensor."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = make_hf_model(hf_dense_config(num_hidden_layers=2), seed=5)
    path = tmp_path_factory.mktemp("src")
    model.save_pretrained(path, max_shard_size="60KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    return path


@pytest.fixture
def ckpt(source, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(source, dst)
    return dst


def _index(ckpt):
    with open(ckpt / "model.safetensors.index.json") as f:
        return json.load(f)


def _shard_of(ckpt, key):
    return ckpt / _index(ckpt)["weight_map"][key]


def _rewrite(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_valid_checkpoint_loads(ckpt):
    config, params = qwen2_jax.load_checkpoint(ckpt)
    assert params["layers"]["self_attn"]["q_kernel"].shape == (2, 64, 4, 16)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="checkpoint not found: /nonexistent/x"):
        qwen2_jax.load_checkpoint("/nonexistent/x")


def test_no_config_json(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        qwen2_jax.load_checkpoint(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        qwen2_jax.load_checkpoint(ckpt)


def test_shard_listed_but_missing(ckpt):
    shard = _shard_of(ckpt, "model.norm.weight")
    os.remove(shard)
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is listed in .* but missing"):
        qwen2_jax.load_checkpoint(ckpt)


def test_missing_tensor(ckpt):
    key = "model.layers.1.self_attn.k_proj.bias"
    _rewrite(_shard_of(ckpt, key), lambda t: t.pop(key))
    index = _index(ckpt)
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        qwen2_jax.load_checkpoint(ckpt)


def test_unexpected_tensor(ckpt):
    shard = _shard_of(ckpt, "model.norm.weight")
    _rewrite(shard, lambda t: t.__setitem__("model.layers.7.mlp.extra.weight", np.zeros((3,), np.float32)))
    index = _index(ckpt)
    index["weight_map"]["model.layers.7.mlp.extra.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.7.mlp.extra.weight'"):
        qwen2_jax.load_checkpoint(ckpt)


def test_config_disagrees_with_tensor_shape(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\], "
        r"config.json implies \[100, 64\]",
    ):
        qwen2_jax.load_checkpoint(ckpt)


def test_truncated_shard(ckpt):
    shard = _shard_of(ckpt, "model.embed_tokens.weight")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated file"):
        qwen2_jax.load_checkpoint(ckpt)


def test_corrupt_header(ckpt):
    shard = _shard_of(ckpt, "model.embed_tokens.weight")
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!!\x00"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt safetensors header"):
        qwen2_jax.load_checkpoint(ckpt)


def test_duplicate_tensor_in_two_shards(ckpt):
    key = "model.norm.weight"
    index = _index(ckpt)
    other = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})[0]
    value = load_file(_shard_of(ckpt, key))[key]
    _rewrite(ckpt / other, lambda t: t.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=f"duplicate tensor '{key}'"):
        qwen2_jax.load_checkpoint(ckpt)


def test_invalid_dtype(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        qwen2_jax.load_checkpoint(ckpt, dtype="int8")


def test_dtype_conversion_rounds_to_nearest_even(ckpt):
    import ml_dtypes
    import torch

    _, params = qwen2_jax.load_checkpoint(ckpt, dtype="bfloat16")
    emb = load_file(_shard_of(ckpt, "model.embed_tokens.weight"))["model.embed_tokens.weight"]
    expected = torch.from_numpy(emb).to(torch.bfloat16).view(torch.int16).numpy()
    ours = np.asarray(params["embed_tokens"]).view(np.int16)
    np.testing.assert_array_equal(ours, expected)
    assert np.asarray(params["embed_tokens"]).dtype == ml_dtypes.bfloat16
