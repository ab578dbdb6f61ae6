"""qwen2-train's config: YAML + dotted --set overrides into typed dataclasses; unknown keys and wrong types
are refused naming the key; the optimizer's schedule and decay mask."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.config import ConfigKeyError, OptimizerConfig, TrainConfig, load_config
from train.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        """
        model: qwen2-0.5b
        batch_size: 16
        mesh: {data: 2, tensor: 2}
        optimizer:
          learning_rate: 1.0e-3
        """,
    )
    cfg = load_config(
        path,
        [
            "total_steps=12",
            "mesh.fsdp=2",
            "mesh.data=1",
            "optimizer.learning_rate=3e-4",
            "dtype=bfloat16",
            "output_dir=/tmp/x",
            "data.sources=[a.txt, b.jsonl]",
            "model_overrides.num_hidden_layers=2",
            "loss.aux_loss_coef=0.01",
        ],
    )
    assert isinstance(cfg, TrainConfig)
    assert (cfg.total_steps, cfg.batch_size, cfg.dtype, cfg.output_dir) == (12, 16, "bfloat16", "/tmp/x")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert) == (1, 2, 2, 1)
    assert cfg.optimizer.learning_rate == 3e-4  # "3e-4" is a string to YAML 1.1: read as a number
    assert cfg.data.sources == ("a.txt", "b.jsonl")
    assert cfg.model_overrides == {"num_hidden_layers": 2}
    assert cfg.loss.aux_loss_coef == 0.01
    assert cfg.to_dict()["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 2, "sequence": 1}


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["no_such_key=1"], "no_such_key"),
        (["mesh.pipeline=2"], "mesh.pipeline"),
        (["optimizer.lr=1e-3"], "optimizer.lr"),
        (["total_steps=ten"], "total_steps"),
        (["total_steps=1.5"], "total_steps"),
        (["mesh.data=true"], "mesh.data"),
        (["async_checkpoints=3"], "async_checkpoints"),
        (["optimizer.learning_rate=fast"], "optimizer.learning_rate"),
        (["dtype=float64"], "dtype"),
        (["remat=some"], "remat"),
        (["mesh=4"], "mesh"),
        (["batch_size=6", "grad_accum_steps=4"], "grad_accum_steps"),
        (["mesh.data=-1", "mesh.tensor=-1"], "mesh.tensor"),
        (["model_overrides.hidden=3"], "model_overrides.hidden"),
        (["seq_len=1"], "seq_len"),
        (["total_steps"], "total_steps"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigKeyError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message
    assert repr(key) in message or f"--set {key!r}" in message, message


def test_unknown_key_in_yaml(tmp_path):
    path = _yaml(
        tmp_path,
        """
        optimizer:
          learning_rate: 1.0e-3
          beta1: 0.9
        """,
    )
    with pytest.raises(ConfigKeyError, match="'optimizer.beta1'"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "nope.yaml"))


def test_schedule_warmup_then_decay():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", final_learning_rate_ratio=0.1)
    sched = learning_rate_schedule(cfg, total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)
    linear = learning_rate_schedule(
        OptimizerConfig(learning_rate=1.0, schedule="linear", final_learning_rate_ratio=0.0), total_steps=100
    )
    np.testing.assert_allclose([float(linear(0)), float(linear(50)), float(linear(100))], [1.0, 0.5, 0.0], atol=1e-6)


def test_weight_decay_spares_norms_biases_embeddings():
    params = {
        "embed_tokens": jnp.ones((4, 2)),
        "norm": {"scale": jnp.ones(2)},
        "layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}},
    }
    mask = decay_mask(params)
    assert mask == {
        "embed_tokens": False,
        "norm": {"scale": False},
        "layers": {"self_attn": {"q_proj": {"kernel": True, "bias": False}}},
    }
    cfg = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, clip_norm=0.0, schedule="constant")
    tx, _ = make_optimizer(cfg, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # with zero gradients only decayed leaves move
    assert float(jnp.abs(updates["layers"]["self_attn"]["q_proj"]["kernel"]).max()) > 0
    for leaf in (updates["embed_tokens"], updates["norm"]["scale"], updates["layers"]["self_attn"]["q_proj"]["bias"]):
        assert float(jnp.abs(leaf).max()) == 0.0
