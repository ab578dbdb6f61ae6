"""The training loop in-process, on 8 fake CPU devices with a synthetic data stand-in: the loss falls;
gradient accumulation equals the large batch; an fsdp x tensor mesh equals data parallelism; a run
interrupted and restarted logs the unbroken run's losses; a non-finite loss stops the run keeping the
last good checkpoint; a tiny MoE trains with expert parallelism; checkpoints load for generation."""

import json
import os

import jax
import numpy as np
import pytest

import qwen2_jax
from train.config import load_config
from train.loop import NonFiniteError, UsageError, build_run, train
from train.train_step import new_state
from train_utils import TINY_MODEL, SyntheticData

SEQ = 32
TINY_MOE = dict(
    TINY_MODEL,
    model_type="qwen2_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=32,
    router_aux_loss_coef=0.01,
)


def _config(tmp_path, *overrides, model=TINY_MODEL, name="run"):
    sets = [
        f"output_dir={tmp_path / name}",
        "model=qwen2-0.5b",
        "total_steps=8",
        "log_every=1",
        "checkpoint_every=4",
        "batch_size=8",
        f"seq_len={SEQ}",
        "optimizer.learning_rate=1e-2",
        "optimizer.warmup_steps=2",
        "loss.chunk_length=8",
        "progress=false",
        "mesh.data=-1",
    ]
    sets += [f"model_overrides.{k}={v}" for k, v in model.items()]
    return load_config(None, sets + list(overrides))


def _losses(output_dir, key="loss"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


class _Interrupted(Exception):
    pass


class _StopsAfter(SyntheticData):
    """Raises from the data iterator after `n` batches: a run killed between steps."""

    def __init__(self, n, *args):
        super().__init__(*args)
        self.n = n

    def train_iterator(self, **kw):
        it = super().train_iterator(**kw)
        n, nxt = self.n, it.__next__

        class Wrapped:
            def __next__(self):
                if it.index >= n:
                    raise _Interrupted()
                return nxt()

            get_state, set_state = it.get_state, it.set_state

        return Wrapped()


@pytest.mark.slow
def test_loss_falls_and_resume_is_identical(tmp_path):
    data = SyntheticData(TINY_MODEL["vocab_size"], SEQ)
    train(_config(tmp_path, name="unbroken"), data=data, log=lambda *_: None)
    unbroken = _losses(tmp_path / "unbroken")
    assert len(unbroken) == 8
    assert unbroken[-1] < unbroken[0] - 0.1, unbroken

    with pytest.raises(_Interrupted):  # dies before step 7, after the step-4 checkpoint
        train(_config(tmp_path, name="broken"), data=_StopsAfter(6, TINY_MODEL["vocab_size"], SEQ), log=lambda *_: None)
    summary = train(_config(tmp_path, name="broken"), data=data, log=lambda *_: None)
    assert summary["step"] == 8
    assert _losses(tmp_path / "broken") == unbroken  # bit-identical, one record per step

    config, params = qwen2_jax.load_checkpoint(str(tmp_path / "broken" / "checkpoints"))
    assert config.num_hidden_layers == TINY_MODEL["num_hidden_layers"]
    assert len(qwen2_jax.generate(config, params, [[1, 2, 3]], 4)[0]) == 4


def _one_step(config, seed=0):
    """Metrics and params after one step from the same init and batch."""
    run = build_run(config)
    params = run.setup.init_params(seed)
    state = new_state(params, run.tx, seed, run.shardings)
    rows = SyntheticData(TINY_MODEL["vocab_size"], SEQ).train_iterator(
        global_batch_size=config.batch_size, seed=0, process_index=0, process_count=1
    )
    from train.batches import global_batch

    batch = global_batch(next(rows), run.batch_sharding, config.batch_size)
    state, metrics = run.train_step(state, batch)
    return jax.device_get(metrics), jax.device_get(state.params)


def _assert_same_step(a, b, rtol):
    (ma, pa), (mb, pb) = a, b
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=rtol, err_msg=key)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-2)


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    large = _one_step(_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    accumulated = _one_step(_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "grad_accum_steps=2"))
    _assert_same_step(large, accumulated, rtol=2e-5)


@pytest.mark.slow
def test_fsdp_tensor_mesh_equals_data_parallel(tmp_path):
    data = _one_step(_config(tmp_path, "mesh.data=8"))
    sharded = _one_step(_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    _assert_same_step(data, sharded, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_same_step(tmp_path, remat):
    base = _one_step(_config(tmp_path, "mesh.data=8"))
    _assert_same_step(base, _one_step(_config(tmp_path, "mesh.data=8", f"remat={remat}")), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_with_float32_master_weights(tmp_path):
    base = _one_step(_config(tmp_path, "mesh.data=8"))
    mixed = _one_step(_config(tmp_path, "mesh.data=8", "dtype=bfloat16", "param_dtype=float32"))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(mixed[1]))
    np.testing.assert_allclose(float(mixed[0]["loss"]), float(base[0]["loss"]), rtol=2e-2)


def test_non_finite_loss_stops_keeping_last_good_checkpoint(tmp_path):
    cfg = _config(
        tmp_path,
        "optimizer.learning_rate=1e30",
        "optimizer.warmup_steps=0",
        "optimizer.clip_norm=0",
        "checkpoint_every=1",
        "total_steps=6",
        "async_checkpoints=false",
    )
    with pytest.raises(NonFiniteError, match=r"at step (\d)") as e:
        train(cfg, data=SyntheticData(TINY_MODEL["vocab_size"], SEQ), log=lambda *_: None)
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == bad_step - 1
    assert f"last good checkpoint: step {bad_step - 1}" in str(e.value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("mesh.data=3",), "needs 3 devices"),
        (("batch_size=12", "mesh.data=8"), "not divisible by the data-parallel"),
        (("batch_size=8", "grad_accum_steps=2", "mesh.data=8"), "micro-batch 4"),
    ],
)
def test_mesh_and_batch_errors(tmp_path, overrides, match):
    with pytest.raises(UsageError, match=match):
        build_run(_config(tmp_path, *overrides))


@pytest.mark.slow
def test_moe_trains_with_expert_parallelism(tmp_path):
    cfg = _config(tmp_path, "mesh.expert=2", "mesh.data=-1", "total_steps=4", model=TINY_MOE)
    train(cfg, data=SyntheticData(TINY_MOE["vocab_size"], SEQ), log=lambda *_: None)
    aux = _losses(tmp_path / "run", "aux_loss")
    assert len(aux) == 4 and all(np.isfinite(aux)) and all(a > 0 for a in aux)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0]


def test_params_and_adam_moments_are_sharded_alike(tmp_path):
    run = build_run(_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    state = new_state(run.setup.init_params(0), run.tx, 0, run.shardings)
    params = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert any(not s.is_fully_replicated for s in params.values())
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = "".join(str(k) for k in path if isinstance(k, jax.tree_util.DictKey))
        if keys in params and leaf.ndim:
            assert leaf.sharding == params[keys], keys
            moments += 1
    assert moments == 2 * len(params)  # mu and nu of every parameter
