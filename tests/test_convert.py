"""qwen2-convert: HF -> Orbax -> HF round trips, logits on a fake mesh, dtype changes, layouts."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import qwen2_jax
from convert_utils import ASSETS, TORCH_DTYPES, run_cli, save_hf, tensors_of, torch_bytes
from hf_utils import hf_logits, rel_err
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.params import param_shardings
from qwen2_jax.sharding import make_mesh
from tolerances import PARITY_REL

SOURCES = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "float32-tied": dict(dtype="float32", tied=True),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (case, HF model, source dir, orbax dir, back dir), each converted once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            base = tmp_path_factory.mktemp(case)
            src, ob, back = base / "hf", base / "orbax", base / "back"
            model = save_hf(src, seed=len(case), **SOURCES[case])
            from convert.cli import main

            assert main(["hf-to-orbax", str(src), str(ob), "--quiet"]) == 0
            assert main(["orbax-to-hf", str(ob), str(back), "--quiet", "--max-shard-size", "30KB"]) == 0
            cache[case] = case, model, str(src), str(ob), str(back)
        return cache[case]

    return get


@pytest.fixture(params=sorted(SOURCES))
def round_trip(request, converted):
    return converted(request.param)


def test_round_trip_is_bit_exact(round_trip):
    case, _, src, _, back = round_trip
    assert len([p for p in os.listdir(src) if p.endswith(".safetensors")]) > 3  # really sharded
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
    a, b = tensors_of(src), tensors_of(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k  # dtype, shape, bytes
    assert ("lm_head.weight" in b) == ("tied" not in case)


def test_round_trip_loads_in_transformers(round_trip):
    case, _, src, _, back = round_trip
    from transformers import AutoModelForCausalLM

    # Compared with the source loaded the same way (an in-memory model cast with .to() also casts its
    # rotary buffers, which a loaded one computes in float32).
    loaded = [
        AutoModelForCausalLM.from_pretrained(d, dtype=TORCH_DTYPES[SOURCES[case]["dtype"]], use_safetensors=True).eval()
        for d in (src, back)
    ]
    ids = np.random.RandomState(0).randint(0, 128, (2, 9))
    assert np.array_equal(hf_logits(loaded[0], ids), hf_logits(loaded[1], ids))
    for name in ASSETS:
        with open(os.path.join(back, name)) as f:
            assert f.read() == ASSETS[name]
    assert os.path.exists(os.path.join(back, "generation_config.json"))


def test_orbax_layout_and_metadata(round_trip):
    case, _, src, ob, _ = round_trip
    with open(os.path.join(ob, oc.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["format_version"] == oc.FORMAT_VERSION and meta["layout"] == "stacked-layers-v1"
    assert meta["dtype"] == SOURCES[case]["dtype"] and meta["source"].endswith(os.path.abspath(src))
    assert qwen2_jax.Qwen2Config.from_hf(ob) == qwen2_jax.Qwen2Config.from_hf(meta["config"])
    for name in list(ASSETS) + ["generation_config.json", "config.json"]:
        assert os.path.exists(os.path.join(ob, name)), name
    # A plain Orbax restore (no qwen2-jax code) reads it, stacked layers included.
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(os.path.join(ob, "params"))
    assert tree["layers"]["mlp"]["gate_kernel"].shape == (3, 64, 96)


@pytest.mark.parametrize("case", ["float32", "float32-tied"])
def test_logits_on_8_device_mesh_match_hf(case, converted):
    _, model, _, ob, _ = converted(case)
    mesh = make_mesh(fsdp=2, tensor=4)
    config, params = qwen2_jax.load_checkpoint(ob, mesh=mesh)
    expected = param_shardings(config, mesh, jax.numpy.float32)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim) and got.dtype == np.float32
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 11))
    ours = np.asarray(qwen2_jax.forward(config, params, ids))
    assert rel_err(ours, hf_logits(model, ids)) < PARITY_REL


@pytest.mark.parametrize("case", ["float32"])
def test_dtype_change_rounds_like_torch(case, converted, tmp_path, capfd):
    _, model, src, ob, _ = converted(case)
    state = model.state_dict()
    # HF -> Orbax in bfloat16, back to HF: equal to torch's .to(bfloat16)
    assert run_cli(capfd, "hf-to-orbax", src, tmp_path / "ob16", "--dtype", "bfloat16", "--quiet")[0] == 0
    assert run_cli(capfd, "orbax-to-hf", tmp_path / "ob16", tmp_path / "hf16", "--quiet")[0] == 0
    # Orbax float32 -> HF float16: equal to torch's .to(float16)
    assert run_cli(capfd, "orbax-to-hf", ob, tmp_path / "hf_f16", "--dtype", "float16", "--quiet")[0] == 0
    for out_dir, dtype in (("hf16", torch.bfloat16), ("hf_f16", torch.float16)):
        got = tensors_of(tmp_path / out_dir)
        for k, t in state.items():
            assert got[k][2] == torch_bytes(t.to(dtype)), (out_dir, k)
    # load_checkpoint(dtype=) on an Orbax checkpoint casts the same way
    _, params = qwen2_jax.load_checkpoint(ob, dtype="bfloat16")
    want = state["model.embed_tokens.weight"].to(torch.bfloat16)
    assert np.asarray(params["embed_tokens"]).tobytes() == torch_bytes(want)


@pytest.mark.parametrize("case", ["float32"])
def test_verify_and_progress(case, converted, tmp_path, capfd, monkeypatch):
    _, _, src, _, _ = converted(case)
    rc, out, err = run_cli(capfd, "hf-to-orbax", src, tmp_path / "v", "--verify")
    assert rc == 0, err
    assert "max relative logit difference" in out and "ok" in out
    assert "hf-to-orbax" in err and "tensors" in err and "ETA" in err  # the progress bar
    import convert.verify

    monkeypatch.setitem(convert.verify.TOLERANCE, "float32", 0.0)
    rc, out, err = run_cli(capfd, "orbax-to-hf", tmp_path / "v", tmp_path / "v_hf", "--verify", "--quiet")
    assert rc == 1 and "FAILED" in out and err == ""


@pytest.mark.parametrize("case", ["bfloat16"])
def test_training_checkpoint_layouts(case, converted, tmp_path, capfd):
    """A run root with step dirs (params item + optimizer item), and params nested in one tree."""
    _, _, src, ob, _ = converted(case)
    import orbax.checkpoint as ocp

    config, params = qwen2_jax.load_checkpoint(ob)
    run = tmp_path / "run"
    for step in (3, 7):  # the latest step is the one restored
        step_params = params if step == 7 else jax.tree.map(lambda x: x * 2, params)
        oc.save(str(run / str(step)), config, step_params, source="training")
        ocp.PyTreeCheckpointer().save(str(run / str(step) / "opt_state"), {"mu": np.ones(3, np.float32)})
    os.replace(run / "7" / oc.METADATA_FILE, run / oc.METADATA_FILE)  # metadata at the run root
    assert oc.is_orbax_checkpoint(str(run))
    _, restored = qwen2_jax.load_checkpoint(str(run))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, restored))
    assert run_cli(capfd, "orbax-to-hf", run, tmp_path / "from_run", "--quiet")[0] == 0
    assert tensors_of(tmp_path / "from_run") == tensors_of(src)

    nested = tmp_path / "nested"
    os.makedirs(nested)
    ocp.PyTreeCheckpointer().save(str(nested / "params"), {"params": params, "opt_state": {"count": np.int32(5)}})
    oc.write_checkpoint_files(str(nested), config, "bfloat16", source="training")
    _, restored = qwen2_jax.load_checkpoint(str(nested))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, restored))
    assert run_cli(capfd, "orbax-to-hf", nested, tmp_path / "from_nested", "--quiet")[0] == 0
    assert tensors_of(tmp_path / "from_nested") == tensors_of(src)


def test_moe_round_trip_and_restore_on_expert_mesh(tmp_path, capfd):
    """Per-expert HF tensors <-> stacked [layers, experts, ...] leaves, through the same table."""
    pytest.importorskip("qwen2_jax.moe")
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from hf_utils import randomize_all

    cfg = Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        max_position_embeddings=256,
    )
    src, ob, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "back"
    randomize_all(Qwen2MoeForCausalLM(cfg).eval()).to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert run_cli(capfd, "hf-to-orbax", src, ob, "--quiet")[0] == 0
    rc, out, err = run_cli(capfd, "orbax-to-hf", ob, back, "--quiet", "--verify")
    assert rc == 0 and "ok" in out, out + err
    assert tensors_of(back) == tensors_of(src)
    mesh = make_mesh(expert=4, tensor=2)
    _, from_orbax = qwen2_jax.load_checkpoint(ob, mesh=mesh)
    _, from_hf = qwen2_jax.load_checkpoint(src, mesh=mesh)
    assert from_orbax["layers_0"]["mlp"]["experts"]["gate_kernel"].shape == (1, 4, 64, 32)
    for a, b in zip(jax.tree.leaves(from_orbax), jax.tree.leaves(from_hf), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim) and np.array_equal(np.asarray(a), np.asarray(b))
