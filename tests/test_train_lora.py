"""LoRA fine-tuning in qwen2-train (train/lora_setup.py), in-process on 8 fake CPU devices with the
synthetic data stand-in, from a tiny random HF checkpoint (float32, every weight random).

The base is frozen bit for bit while the adapters move; the optimizer state holds adapter-shaped
leaves only; step 0's loss is the full model's (B = 0); the loss falls; a sharded run equals one
device; an interrupted run resumes with the unbroken run's losses; an int8 or bfloat16 base trains;
the PEFT adapter directory the run writes loads in peft with our logits and merges with
`qwen2-convert merge-lora`. `tests/test_train_lora_cli.py` drives the CLI (SFT, SIGKILL)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

import qwen2_jax
from convert_utils import run_cli, save_hf
from hf_utils import hf_logits, rel_err
from qwen2_jax import lora
from qwen2_jax.forward import forward
from qwen2_jax.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter
from qwen2_jax.safetensors_io import CheckpointError
from train.batches import global_batch
from train.config import ConfigKeyError, LoraSection, load_config
from train.loop import build_run, train
from train.train_step import new_state
from train_utils import SyntheticData

SEQ = 32
VOCAB = 128  # tests/hf_utils.py's tiny shape
STEPS = 8
TOL = 1e-5  # logits against peft, float32


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-base")
    model = save_hf(path, layers=2)
    return model, str(path)


def _config(output_dir, model, *overrides):
    sets = [
        f"output_dir={output_dir}",
        f"model={model}",
        f"total_steps={STEPS}",
        "log_every=1",
        "checkpoint_every=4",
        "eval_every=4",
        "eval_batches=1",
        "batch_size=8",
        f"seq_len={SEQ}",
        "optimizer.learning_rate=3e-2",
        "optimizer.warmup_steps=1",
        "loss.chunk_length=16",
        "progress=false",
        "mesh.data=-1",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
    ]
    return load_config(None, sets + list(overrides))


def _losses(output_dir, key="loss"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [record[key] for record in map(json.loads, f) if key in record]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_base):
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    train(_config(output_dir, hf_base[1]), data=SyntheticData(VOCAB, SEQ), log=_quiet)
    return output_dir


def _batch(run, seed=0):
    rows = SyntheticData(VOCAB, SEQ).train_iterator(
        global_batch_size=run.config.batch_size, seed=seed, process_index=0, process_count=1
    )
    return global_batch(next(rows), run.batch_sharding, run.config.batch_size)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _steps(config, n, devices=None):
    """(metrics of each step, base before, state after) of n LoRA steps on one batch."""
    run = build_run(config, devices)
    state = run.lora.new_state(run.source, run.tx, config.seed, run.shardings)
    base_before = _host(state.frozen)
    batch = _batch(run)
    metrics = []
    for _ in range(n):
        state, m = run.train_step(state, batch)
        metrics.append(_host(m))
    return metrics, base_before, state, run


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, hf_base):
    return _steps(_config(tmp_path_factory.mktemp("steps") / "run", hf_base[1]), 3)


def test_base_frozen_adapters_trained_optimizer_state_adapter_only(three_steps):
    metrics, base_before, state, run = three_steps
    base_after = _host(state.frozen)
    assert jax.tree.structure(base_after) == jax.tree.structure(base_before)
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        assert before.dtype == after.dtype and np.array_equal(before, after)  # bit for bit
    adapters = _host(state.params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        assert leaf.dtype == np.float32
        if path[-1].key == "b":
            assert np.abs(leaf).max() > 0, path  # B starts at 0 and moved
    # Adam's moments are adapter-shaped; nothing of the base's shape is in the state
    adapter_shapes = {leaf.shape for leaf in jax.tree.leaves(adapters)}
    opt_leaves = jax.tree.leaves(state.opt_state)
    assert {leaf.shape for leaf in opt_leaves} <= adapter_shapes | {()}
    adapter_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(adapters))
    opt_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in opt_leaves)
    assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 64
    assert metrics[2]["loss"] < metrics[0]["loss"]


def test_step_0_loss_is_the_full_models(tmp_path, hf_base, three_steps):
    """B = 0: the adapted model starts as the base, so LoRA's first loss is full fine-tuning's."""
    lora_metrics = three_steps[0]
    config = _config(tmp_path / "full", hf_base[1], "lora.rank=0")
    run = build_run(config)
    assert run.lora is None
    state = new_state(run.setup.load_params(hf_base[1]), run.tx, 0, run.shardings)
    _, full = run.train_step(state, _batch(run))
    np.testing.assert_allclose(lora_metrics[0]["loss"], float(full["loss"]), rtol=1e-6)


def test_sharded_run_equals_one_device(tmp_path, hf_base):
    """fsdp=2 x tensor=4 (adapters sharded like their kernels) against one device: losses, gradient
    norms and the trained adapters."""
    one = _steps(_config(tmp_path / "one", hf_base[1], "mesh.data=1"), 2, devices=jax.devices()[:1])
    mesh = _config(tmp_path / "mesh", hf_base[1], "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4")
    sharded = _steps(mesh, 2)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded[2].params)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    for a, b in zip(one[0], sharded[0]):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=2e-6)
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(_host(one[2].params)), jax.tree.leaves(_host(sharded[2].params))):
        # Adam's first steps move an entry by ~lr whatever its gradient's size: one whose gradient is
        # float noise moves by noise-sized amounts (measured 3.6e-4 of the largest entry)
        assert rel_err(a, b) <= 2e-3


def test_gradient_accumulation_equals_the_large_batch(tmp_path, hf_base):
    """Two micro-batches of 4 rows against one batch of 8 (no dropout: its masks are drawn per
    micro-batch): the same losses and adapters."""
    whole = _steps(_config(tmp_path / "whole", hf_base[1], "lora.dropout=0", "mesh.data=4", "mesh.tensor=2"), 2)
    micro = _steps(
        _config(tmp_path / "micro", hf_base[1], "lora.dropout=0", "mesh.data=4", "mesh.tensor=2", "grad_accum_steps=2"),
        2,
    )
    for a, b in zip(whole[0], micro[0]):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(_host(whole[2].params)), jax.tree.leaves(_host(micro[2].params))):
        assert rel_err(a, b) <= 2e-3


def test_loss_falls_and_the_run_writes_a_peft_adapter(lora_run):
    losses = _losses(lora_run)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, losses
    eval_losses = _losses(lora_run, "eval_loss")  # held-out loss with the adapters on, no dropout
    assert len(eval_losses) == 2 and eval_losses[1] < eval_losses[0], eval_losses
    checkpoints = lora_run / "checkpoints"
    assert sorted(os.listdir(checkpoints / "adapter")) == [CONFIG_FILE, WEIGHTS_FILE]
    step_items = set(os.listdir(checkpoints / str(STEPS)))
    assert {"adapters", "opt_state", "meta"} <= step_items and "params" not in step_items  # no base copy
    with pytest.raises(CheckpointError, match="a LoRA training run's checkpoints .* adapter="):
        qwen2_jax.load_checkpoint(str(checkpoints))


class _Interrupted(Exception):
    pass


class _StopsAfter(SyntheticData):
    """Raises from the data iterator after `n` batches: a run killed between steps."""

    def __init__(self, n):
        super().__init__(VOCAB, SEQ)
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


def test_interrupted_run_resumes_with_the_unbroken_losses(tmp_path, hf_base, lora_run):
    """Killed after step 6 (checkpoint at 4), rerun: the adapters, their optimizer state, the data
    position and the dropout keys come back; the base is loaded again from `model`."""
    config = _config(tmp_path / "broken", hf_base[1])
    with pytest.raises(_Interrupted):
        train(config, data=_StopsAfter(6), log=_quiet)
    train(config, data=SyntheticData(VOCAB, SEQ), log=_quiet)
    assert _losses(tmp_path / "broken") == _losses(lora_run)  # bit-identical, one record per step
    assert _losses(tmp_path / "broken", "eval_loss") == _losses(lora_run, "eval_loss")


def test_resuming_a_lora_run_as_full_fine_tuning_is_refused(tmp_path, hf_base, lora_run):
    output_dir = tmp_path / "copy"
    shutil.copytree(lora_run, output_dir)
    with pytest.raises(CheckpointError, match=r"has no params/ \(a LoRA fine-tuning run's checkpoint\?\)"):
        train(_config(output_dir, hf_base[1], "lora.rank=0"), data=SyntheticData(VOCAB, SEQ), log=_quiet)


def test_resuming_with_another_rank_is_refused(tmp_path, hf_base, lora_run):
    output_dir = tmp_path / "copy"
    shutil.copytree(lora_run, output_dir)
    with pytest.raises(CheckpointError, match="holds LoRA adapters of rank 4 on q_proj, .* this run asks for rank 8"):
        train(_config(output_dir, hf_base[1], "lora.rank=8"), data=SyntheticData(VOCAB, SEQ), log=_quiet)


def _ids(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _err(a, b, mask):
    real = mask.astype(bool)
    return rel_err(np.asarray(a)[real], np.asarray(b)[real])


def test_the_runs_adapter_loads_in_peft_and_merges(tmp_path, capfd, hf_base, lora_run):
    """peft.PeftModel.from_pretrained(HF base, <run>/checkpoints/adapter) gives our logits (base +
    adapters), and `qwen2-convert merge-lora` makes a checkpoint with the same logits."""
    peft = pytest.importorskip("peft")
    model, path = hf_base
    adapter_dir = str(lora_run / "checkpoints" / "adapter")
    config, params = qwen2_jax.load_checkpoint(path)
    lora_config, adapters = load_peft_adapter(adapter_dir, config)
    assert (lora_config.rank, lora_config.alpha, lora_config.dropout) == (4, 8.0, 0.1)
    ids, mask = _ids()
    ours = np.asarray(forward(config, lora.apply(params, adapters, lora_config), ids, mask))
    base = hf_logits(model, ids, mask)
    assert _err(ours, base, mask) > 1e-3  # training moved the model
    theirs = hf_logits(peft.PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval(), ids, mask)
    assert _err(ours, theirs, mask) <= TOL
    merged_dir = tmp_path / "merged"
    rc, _, err = run_cli(capfd, "merge-lora", path, adapter_dir, merged_dir, "--quiet")
    assert rc == 0, err
    merged_config, merged = qwen2_jax.load_checkpoint(str(merged_dir))
    merged_err = _err(np.asarray(forward(merged_config, merged, ids, mask)), theirs, mask)
    print(
        f"\ntrained adapter (moved the logits by {_err(ours, base, mask):.1e}): ours vs peft "
        f"{_err(ours, theirs, mask):.1e}, merge-lora vs peft {merged_err:.1e}"
    )
    assert merged_err <= TOL


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_a_low_precision_base_trains(tmp_path, hf_base, three_steps, base_dtype):
    """The frozen base in bfloat16, or int8 kernels (QLoRA-style; embeddings, norms and the LM head
    in param_dtype): adapters stay float32, the base is untouched, the loss starts near the float
    base's and falls."""
    config = _config(tmp_path / base_dtype, hf_base[1], f"lora.base_dtype={base_dtype}")
    metrics, base_before, state, _ = _steps(config, 3)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(base_before)}
    assert base_dtype in dtypes, dtypes
    assert "lm_head_int8" not in base_before and "lm_head" in base_before
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(_host(state.frozen))):
        assert np.array_equal(before, after)
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
    float_loss = three_steps[0][0]["loss"]
    assert abs(metrics[0]["loss"] - float_loss) < 0.02 * float_loss, (metrics[0]["loss"], float_loss)
    assert metrics[2]["loss"] < metrics[0]["loss"]


@pytest.mark.parametrize(
    "override,match",
    [
        ("lora.rnk=4", "unknown config key 'lora.rnk' in section 'lora'"),
        ("lora.rank=-1", "'lora.rank' must be >= 0"),
        ("lora.target_modules=[q_proj,lm_head]", "'lora.target_modules' has unknown module 'lm_head'"),
        ("lora.base_dtype=int4", "'lora.base_dtype' must be one of"),
        ("lora.dropout=1.0", "'lora.dropout' must be in [0, 1)"),
    ],
)
def test_bad_lora_keys_name_the_key(override, match):
    with pytest.raises(ConfigKeyError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["lora.rank=8", override])


def test_defaults_target_every_module():
    assert LoraSection().target_modules == lora.TARGET_MODULES
    assert LoraSection().rank == 0  # off unless asked


def test_moe_models_are_refused_before_anything_is_built(tmp_path):
    from qwen2_jax.config import ConfigError

    moe = dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    sets = [f"model_overrides.{k}={v}" for k, v in moe.items()] + ["model_overrides.num_hidden_layers=2"]
    with pytest.raises(ConfigError, match="lora: LoRA adapters are supported for dense Qwen2 models only"):
        build_run(_config(tmp_path / "moe", "qwen2-0.5b", *sets))


def test_optimizer_state_at_qwen2_0_5b_rank_16_is_under_2_percent_of_full():
    """qwen2-train's real state (its optimizer chain over what it trains), abstract: nothing allocated.
    bench/lora_state.py prints the same for other presets, ranks and base dtypes."""

    def state_bytes(*overrides):
        config = load_config(None, ["model=qwen2-0.5b", "mesh.data=1", "batch_size=1", *overrides])
        state = build_run(config, devices=jax.devices()[:1]).abstract_state()
        return {
            part: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(getattr(state, part)))
            for part in ("opt_state", "frozen")
        }

    full = state_bytes()
    ours = state_bytes("lora.rank=16", "lora.alpha=32", "lora.base_dtype=bfloat16")
    print(
        f"\nqwen2-0.5b rank 16 optimizer state: {ours['opt_state'] / 2**20:.1f} / {full['opt_state'] / 2**20:.1f} MiB"
    )
    assert ours["opt_state"] <= 0.02 * full["opt_state"]  # measured 1.78%
    # a bfloat16 base is a quarter of full fine-tuning's two float32 moments (and its step counts)
    assert full["frozen"] == 0 and 0 <= full["opt_state"] - 4 * ours["frozen"] <= 64
