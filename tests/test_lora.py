"""LoRA adapters (qwen2_jax.lora, qwen2_jax.peft_adapter, qwen2-convert merge-lora) against peft's
own LoRA on the same tiny random Qwen2 (float32, every base and adapter weight randomised, B != 0)."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import qwen2_jax
from convert_utils import leftovers, run_cli, save_hf
from hf_utils import hf_logits, rel_err
from qwen2_jax import lora
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.config import preset
from qwen2_jax.forward import forward, forward_outputs
from qwen2_jax.layouts import relayout
from qwen2_jax.matmul import Int8Kernel, dequantize, int8_dot, quantize_int8
from qwen2_jax.options import RunOptions
from qwen2_jax.params import abstract_params
from qwen2_jax.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, load_peft_adapter, save_peft_adapter
from qwen2_jax.quantize import quantize_params

peft = pytest.importorskip("peft")

TOL = 1e-5  # logits, float32 (the bar)
GRAD_TOL = 1e-4
SUBSET = ("q_proj", "v_proj", "down_proj")
# Random adapter entries: B @ A * scale then moves each kernel by ~20% of the base's own random entries
# (0.2), enough to change the logits by >1%. Measured ours vs peft at 0.1: 0.9-3.2e-6, the base model's
# own ours-vs-HF level (0.9-2.0e-6) on the same batches; at 0.3 (kernels moved by ~2x their size, a far
# more chaotic model) up to 8e-6 unmerged and 1.1e-5 merged.
ADAPTER_STD = 0.1


def _ids(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding: positions count real tokens only, in both models
    return ids, mask


def _err(a, b, mask) -> float:
    """Relative error over real tokens (the logits of padding positions are not defined)."""
    real = np.asarray(mask).astype(bool)
    return rel_err(np.asarray(a)[real], np.asarray(b)[real])


def _peft_model(hf_model, targets, rank=4, alpha=8.0, seed=1, rslora=False):
    """peft's LoRA on a copy of the model, every lora_A / lora_B randomised (peft's B starts at 0)."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=rslora
    )
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(ADAPTER_STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def _random_adapters(config, lora_config, seed=0):
    adapters = lora.init_adapters(config, lora_config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: ADAPTER_STD * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    model = save_hf(path)
    config, params = qwen2_jax.load_checkpoint(str(path))
    return model, str(path), config, params


@pytest.mark.parametrize("targets", [lora.TARGET_MODULES, SUBSET], ids=["all7", "subset"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_peft_adapter_forward_matches_peft(base, tmp_path, targets, rslora):
    """A peft-saved adapter loaded here: our forward with the adapters == peft's LoRA forward."""
    model, _, config, params = base
    pm = _peft_model(model, targets, rslora=rslora)
    pm.save_pretrained(tmp_path)
    lora_config, adapters = load_peft_adapter(tmp_path, config)
    assert lora_config.target_modules == tuple(t for t in lora.TARGET_MODULES if t in targets)
    assert lora_config.use_rslora == rslora
    ids, mask = _ids(config.vocab_size)
    ref = hf_logits(pm, ids, mask)
    ours = np.asarray(forward(config, lora.apply(params, adapters, lora_config), ids, mask))
    base_logits = hf_logits(model, ids, mask)
    assert _err(ref, base_logits, mask) > 1e-2  # the adapters change the logits: a dropped adapter fails
    print(f"\nours vs peft, {len(targets)} targets, rslora={rslora}: {_err(ours, ref, mask):.1e}")
    assert _err(ours, ref, mask) <= TOL, _err(ours, ref, mask)


def test_saved_adapter_loads_in_peft(base, tmp_path):
    """Our random adapters (B != 0) saved as a PEFT directory: peft loads them with our logits, and
    they load back here unchanged."""
    model, path, config, params = base
    lora_config = lora.LoraConfig(rank=6, alpha=12.0, target_modules=("k_proj", "o_proj", "gate_proj", "up_proj"))
    adapters = _random_adapters(config, lora_config)
    out = tmp_path / "adapter"
    save_peft_adapter(out, config, lora_config, adapters, base_model_name_or_path=path)
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not [p for p in os.listdir(tmp_path) if p != "adapter"]  # the temporary directory is gone
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    ids, mask = _ids(config.vocab_size, seed=1)
    ours = np.asarray(forward(config, lora.apply(params, adapters, lora_config), ids, mask))
    assert _err(ours, hf_logits(model, ids, mask), mask) > 1e-2
    print(f"\nour saved adapter in peft vs ours: {_err(ours, hf_logits(pm, ids, mask), mask):.1e}")
    assert _err(ours, hf_logits(pm, ids, mask), mask) <= TOL
    again_config, again = load_peft_adapter(out, config)
    assert again_config == lora_config
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), adapters, again)


def test_merge_matches_merge_and_unload(base):
    model, _, config, params = base
    pm = _peft_model(model, lora.TARGET_MODULES, seed=3)
    state = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    merged_ref = pm.merge_and_unload()
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _adapters_from_state(config, lora_config, state)
    merged = lora.merge(params, adapters, lora_config, config)
    assert "q_kernel_lora" not in merged["layers"]["self_attn"]  # plain params
    ids, mask = _ids(config.vocab_size, seed=2)
    err = _err(np.asarray(forward(config, merged, ids, mask)), hf_logits(merged_ref, ids, mask), mask)
    print(f"\nlora.merge vs peft merge_and_unload: {err:.1e}")
    assert err <= TOL


def _adapters_from_state(config, lora_config, state):
    """Our adapter tree from a peft model's state dict (the peft file format's transform, by hand)."""
    dims = lora.kernel_dims(config)
    tree: dict = {}
    for module in lora_config.target_modules:
        sub, name = lora.TARGETS[module]
        a_l, b_l = [], []
        for i in range(config.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{i}.{sub}.{module}"
            a_l.append(state[f"{prefix}.lora_A.default.weight"].T.reshape(*dims[module][0], lora_config.rank))
            b_l.append(state[f"{prefix}.lora_B.default.weight"].T.reshape(lora_config.rank, *dims[module][1]))
        tree.setdefault(sub, {})[name] = {"a": jnp.asarray(np.stack(a_l)), "b": jnp.asarray(np.stack(b_l))}
    return {"layers": tree}


def test_gradients_reach_adapters_only_and_match_peft(base):
    """jax.grad w.r.t. the adapters (base frozen: not an argument) == torch's gradients of peft's
    lora_A / lora_B, for one weighted sum of the logits."""
    model, _, config, params = base
    pm = _peft_model(model, SUBSET, seed=5)
    pm.train()  # as a training step runs it (dropout 0: the same forward as eval mode)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, target_modules=SUBSET)
    state = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    adapters = _adapters_from_state(config, lora_config, state)
    ids, mask = _ids(config.vocab_size, seed=3)
    weights = np.random.RandomState(4).randn(*ids.shape, config.vocab_size).astype(np.float32)
    weights *= mask[..., None]

    def loss(ad):
        logits = forward_outputs(config, lora.apply(params, ad, lora_config), ids, mask)["logits"]
        return jnp.sum(logits * weights) / 100.0

    grads = jax.grad(loss)(adapters)
    pos = torch.as_tensor((np.cumsum(mask, -1) - 1).clip(0) * mask)
    out = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=pos)
    (torch.sum(out.logits * torch.as_tensor(weights)) / 100.0).backward()
    for p_name, p in pm.named_parameters():
        assert p.requires_grad == ("lora_" in p_name)  # peft freezes the base as ours does
    ref = _adapters_from_state(config, lora_config, dict(_grad_state(pm)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref
        for k in path:
            r = r[k.key]
        g, r = np.asarray(g), np.asarray(r)
        assert np.max(np.abs(g)) > 0
        print(f"\ngradient {jax.tree_util.keystr(path)} vs peft: {rel_err(g, r):.1e}")
        assert rel_err(g, r) <= GRAD_TOL, (path, rel_err(g, r))


def _grad_state(pm):
    for name, p in pm.named_parameters():
        if "lora_" in name:
            yield name, p.grad.detach().numpy()


def _layout_case(base):
    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(config, lora_config, seed=7)
    ids, mask = _ids(config.vocab_size, seed=5)
    stacked = np.asarray(forward(config, lora.apply(params, adapters, lora_config), ids, mask))
    return config, params, lora_config, adapters, ids, mask, stacked


def test_generation_layout(base):
    """The same adapters on per-layer [out, in] params (generation's layout) give the stacked result."""
    config, params, lora_config, adapters, ids, mask, stacked = _layout_case(base)
    options = RunOptions(layer_layout="per_layer", kernel_layout="out_in")
    per_layer = relayout(config, params, options)
    got = forward_outputs(config, lora.apply(per_layer, adapters, lora_config), ids, mask, options=options)
    assert _err(np.asarray(got["logits"]), stacked, mask) <= TOL


def test_low_precision_bases(base):
    """On bfloat16 and int8 bases the adapters move the logits as on the float32 base."""
    config, params, lora_config, adapters, ids, mask, stacked = _layout_case(base)
    # bfloat16 base (bfloat16 activations, float32 adapter product): as close to the float32 adapted
    # model as the bfloat16 base is to the float32 base, and closer to it than the unadapted base
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    low_base = np.asarray(forward(config, low, ids, mask))
    with_adapters = np.asarray(forward(config, lora.apply(low, adapters, lora_config), ids, mask))
    base_gap, gap = _err(low_base, forward(config, params, ids, mask), mask), _err(with_adapters, stacked, mask)
    print(f"\nbfloat16 vs float32: base {base_gap:.2e}, with adapters {gap:.2e}")
    assert gap <= 2 * base_gap and gap < _err(low_base, stacked, mask)
    # int8 base: equal to its dequantized float32 kernels with the same adapters
    quantized = quantize_params(config, params)
    dequantized = _dequantized(config, quantized)
    got = forward(config, lora.apply(quantized, adapters, lora_config), ids, mask)
    want = forward(config, lora.apply(dequantized, adapters, lora_config), ids, mask)
    print(f"\nint8 base + adapters vs dequantized float32 + adapters: {_err(got, want, mask):.1e}")
    assert _err(got, want, mask) <= TOL and _err(want, forward(config, dequantized, ids, mask), mask) > 1e-2


def _dequantized(config, quantized):
    """Float32 params holding the kernels an int8 (checkpoint layout, untied) model stands for."""
    out = {k: v for k, v in quantized.items() if k not in ("lm_head_int8", "lm_head_int8_scale")}
    out["lm_head"] = dequantize(Int8Kernel(quantized["lm_head_int8"], quantized["lm_head_int8_scale"]), (1,)).T
    layers = out["layers"] = {sub: dict(v) for sub, v in quantized["layers"].items()}
    for module, (in_dims, _) in lora.kernel_dims(config).items():
        sub, name = lora.TARGETS[module]
        kernel = Int8Kernel(layers[sub][name], layers[sub].pop(name + "_scale"))
        layers[sub][name] = dequantize(kernel, tuple(range(1, 1 + len(in_dims))))
    return out


def test_dropout_only_on_the_adapter_path(base):
    """With a dropout key the adapter input is dropped (logits change); without one (inference) no
    dropout; with B = 0 the adapted model is the base exactly, dropout or not."""
    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapters = _random_adapters(config, lora_config, seed=9)
    ids, mask = _ids(config.vocab_size, seed=6)
    plain = np.asarray(forward(config, lora.apply(params, adapters, lora_config), ids, mask))
    no_dropout = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    assert np.array_equal(plain, np.asarray(forward(config, lora.apply(params, adapters, no_dropout), ids, mask)))
    d1 = np.asarray(forward(config, lora.apply(params, adapters, lora_config, jax.random.key(1)), ids, mask))
    d2 = np.asarray(forward(config, lora.apply(params, adapters, lora_config, jax.random.key(2)), ids, mask))
    assert _err(d1, plain, mask) > 1e-3 and _err(d1, d2, mask) > 1e-3
    fresh = lora.init_adapters(config, lora_config, jax.random.key(3))  # B = 0, as peft starts
    base_logits = np.asarray(forward(config, params, ids, mask))
    dropped = forward(config, lora.apply(params, fresh, lora_config, jax.random.key(4)), ids, mask)
    np.testing.assert_array_equal(np.asarray(dropped), base_logits)


def test_init_matches_peft_distribution(base):
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as peft's kaiming_uniform(a=sqrt(5)); B = 0."""
    _, _, config, _ = base
    lora_config = lora.LoraConfig(rank=8)
    adapters = lora.init_adapters(config, lora_config, jax.random.key(0))
    for sub, name, fan_in in (("self_attn", "q_kernel", 64), ("self_attn", "o_kernel", 64), ("mlp", "down_kernel", 96)):
        a = np.asarray(adapters["layers"][sub][name]["a"])
        bound = 1 / np.sqrt(fan_in)
        assert a.dtype == np.float32 and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert not np.asarray(adapters["layers"][sub][name]["b"]).any()


def test_optimizer_state_fraction_qwen2_0_5b():
    """AdamW state of rank-16 adapters on all seven targets of Qwen2-0.5B against full fine-tuning's,
    from shapes only (jax.eval_shape: nothing allocated)."""
    config = preset("qwen2-0.5b")
    lora_config = lora.LoraConfig(rank=16, alpha=32.0)
    tx = optax.adamw(1e-4)

    def state_bytes(abstract):
        state = jax.eval_shape(tx.init, abstract)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

    full = state_bytes(abstract_params(config, jnp.float32))
    abstract = lora.abstract_adapters(config, lora_config)
    adapters = state_bytes(abstract)
    # the same adapter sizes as peft's LoRA on the HF model of this shape (built on the meta device)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_hf()))
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=16, target_modules=list(lora.TARGET_MODULES)))
    theirs = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert theirs == sum(x.size for x in jax.tree.leaves(abstract)) == 8_798_208
    fraction = adapters / full
    mib = 2**20
    print(f"\nQwen2-0.5B AdamW state: rank-16 LoRA {adapters / mib:.1f} MiB, full {full / mib:.1f} MiB, {fraction:.2%}")
    assert fraction <= 0.02


def _write_adapter(tmp_path, config, name="adapter", **changes):
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, target_modules=SUBSET)
    out = tmp_path / name
    save_peft_adapter(out, config, lora_config, _random_adapters(config, lora_config))
    cfg_path = out / CONFIG_FILE
    raw = json.loads(cfg_path.read_text())
    raw.update(changes)
    cfg_path.write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(
    "case, changes, expected",
    [
        ("unknown-target", {"target_modules": ["q_proj", "lm_head"]}, "unknown target module 'lm_head'"),
        ("rank-mismatch", {"r": 8}, "rank mismatch"),
        ("missing-target", {"target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"]}, "missing tensor"),
        ("fewer-targets", {"target_modules": ["q_proj", "v_proj"]}, "unexpected tensor"),
        ("dora", {"use_dora": True}, "use_dora=True is not supported"),
        ("not-lora", {"peft_type": "IA3"}, "is not LORA"),
        ("bad-alpha", {"lora_alpha": -1}, "lora alpha must be a positive number"),
    ],
)
def test_bad_adapter_dirs(base, tmp_path, case, changes, expected):
    _, _, config, _ = base
    out = _write_adapter(tmp_path, config, **changes)
    with pytest.raises(AdapterError, match=expected) as info:
        load_peft_adapter(out, config)
    assert "\n" not in str(info.value)


def test_bad_adapter_files(base, tmp_path):
    _, _, config, _ = base
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_peft_adapter(tmp_path / "nowhere", config)
    out = _write_adapter(tmp_path, config)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"no {WEIGHTS_FILE}"):
        load_peft_adapter(out, config)
    (out / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError, match=f"no {CONFIG_FILE}"):
        load_peft_adapter(out, config)
    other = _write_adapter(tmp_path, config, name="other")
    wider = config.replace(hidden_size=96)  # an adapter made for another base
    with pytest.raises(AdapterError, match="the base model implies"):
        load_peft_adapter(other, wider)
    (other / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_peft_adapter(other, config)


def test_merge_lora_cli(base, tmp_path, capfd):
    """HF and Orbax bases -> merged HF directory or Orbax checkpoint == peft's merge_and_unload
    (logits); bad input exits 2 with one line and creates nothing."""
    model, path, config, _ = base
    pm = _peft_model(model, lora.TARGET_MODULES, seed=11)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    ids, mask = _ids(config.vocab_size, seed=8)
    ref = hf_logits(pm.merge_and_unload(), ids, mask)
    orbax = tmp_path / "orbax"
    assert run_cli(capfd, "hf-to-orbax", path, orbax, "--quiet")[0] == 0
    errors = {}
    for name, src, to in (("hf-to-hf", path, "hf"), ("orbax-to-hf", orbax, "hf"), ("hf-to-orbax", path, "orbax")):
        dst = tmp_path / name
        rc, _, err = run_cli(capfd, "merge-lora", src, adapter, dst, "--to", to, "--quiet")
        assert rc == 0, err
        assert oc.is_orbax_checkpoint(str(dst)) == (to == "orbax")
        merged_config, merged = qwen2_jax.load_checkpoint(str(dst))
        assert "tokenizer.json" in os.listdir(dst)
        errors[name] = f"{_err(np.asarray(forward(merged_config, merged, ids, mask)), ref, mask):.1e}"
    with capfd.disabled():
        print(f"\nmerge-lora vs peft merge_and_unload: {errors}")
    assert max(float(e) for e in errors.values()) <= TOL
    bad = _write_adapter(tmp_path, config, name="bad", r=8)
    for argv, message in (
        (("merge-lora", path, bad, tmp_path / "x"), "rank mismatch"),
        (("merge-lora", path, tmp_path / "none", tmp_path / "x"), "adapter directory not found"),
        (("merge-lora", tmp_path / "none", adapter, tmp_path / "x"), "source not found"),
        (("merge-lora", path, adapter, tmp_path / "x", "--dtype", "int3"), "invalid --dtype"),
        (("merge-lora", path, adapter, adapter / "x"), "must not be"),
        (("merge-lora", path, adapter, tmp_path / "x", "--to", "gguf"), "invalid choice"),
    ):
        rc, out, err = run_cli(capfd, *argv)
        assert rc == 2, (argv, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "x").exists() and not leftovers(tmp_path / "x")


def test_load_checkpoint_with_adapter(base, tmp_path):
    """load_checkpoint(adapter=DIR) == peft's merge_and_unload; int8 on top quantizes the merged model."""
    model, path, config, _ = base
    pm = _peft_model(model, SUBSET, seed=13)
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = _ids(config.vocab_size, seed=9)
    ref = hf_logits(pm.merge_and_unload(), ids, mask)
    merged_config, merged = qwen2_jax.load_checkpoint(path, adapter=tmp_path / "adapter")
    err = _err(forward(merged_config, merged, ids, mask), ref, mask)
    print(f"\nload_checkpoint(adapter=) vs peft merge_and_unload: {err:.1e}")
    assert err <= TOL
    _, quantized = qwen2_jax.load_checkpoint(path, adapter=tmp_path / "adapter", quantize="int8")
    want = forward(config, quantize_params(config, merged), ids, mask)
    np.testing.assert_array_equal(np.asarray(forward(config, quantized, ids, mask)), np.asarray(want))


def test_generate_cli_adapter(base, tmp_path, capsys):
    """qwen2-generate --adapter DIR generates what the merge-lora checkpoint generates; a bad adapter
    is exit 2 with one line."""
    from qwen2_jax import cli

    model, path, config, _ = base
    pm = _peft_model(model, lora.TARGET_MODULES, seed=17)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    merged_dir = tmp_path / "merged"
    assert run_cli(capsys, "merge-lora", path, adapter, merged_dir, "--quiet")[0] == 0
    common = ("--prompt-ids", "1,2,3,4", "--max-new-tokens", "6", "--temperature", "0", "--json")
    outputs = []
    for argv in (("--checkpoint", path, "--adapter", str(adapter)), ("--checkpoint", str(merged_dir))):
        rc = cli.main([*argv, *common])
        out, err = capsys.readouterr()
        assert rc == 0, err
        outputs.append(json.loads(out)["tokens"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    plain = cli.main(["--checkpoint", path, *common])
    assert plain == 0 and json.loads(capsys.readouterr().out)["tokens"] != outputs[0]  # the adapter matters
    bad = _write_adapter(tmp_path, config, name="bad", target_modules=["q_proj", "embed_tokens"])
    rc = cli.main(["--checkpoint", path, "--adapter", str(bad), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown target module 'embed_tokens'" in err and err.count("\n") == 1


def test_sharded_adapters_equal_one_device(base):
    """Base params and adapters placed by the logical rules on a (fsdp=2, tensor=4) mesh: logits and
    adapter gradients equal one device's."""
    from qwen2_jax.sharding import make_mesh
    from tolerances import SHARDED_REL

    _, path, config, params = base
    mesh = make_mesh(fsdp=2, tensor=4, devices=jax.devices()[:8])
    _, sharded = qwen2_jax.load_checkpoint(path, mesh=mesh)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(config, lora_config, seed=21)
    placed = jax.device_put(adapters, lora.adapter_shardings(config, lora_config, mesh))
    assert placed["layers"]["self_attn"]["q_kernel"]["b"].sharding.spec[2] == "tensor"  # q heads split as q_kernel's
    ids, mask = _ids(config.vocab_size, seed=10)

    def loss(ad, p):
        return jnp.sum(forward_outputs(config, lora.apply(p, ad, lora_config), ids, mask)["logits"] ** 2) / 1e4

    ref_loss, ref_grads = jax.value_and_grad(loss)(adapters, params)
    got_loss, got_grads = jax.value_and_grad(loss)(placed, sharded)
    assert abs(float(got_loss) - float(ref_loss)) <= SHARDED_REL * abs(float(ref_loss))
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        assert rel_err(np.asarray(g), np.asarray(r)) <= GRAD_TOL


def test_adapter_axes_follow_their_kernels(base):
    """The adapters' logical axes are their base kernels' input / output axes (so they shard alike)."""
    from qwen2_jax.params import param_logical_axes

    _, _, config, _ = base
    kernel_axes = param_logical_axes(config)["layers"]
    adapter_axes = lora.adapter_logical_axes(lora.LoraConfig())["layers"]
    for module, (in_dims, _) in lora.kernel_dims(config).items():
        sub, name = lora.TARGETS[module]
        axes, n_in = kernel_axes[sub][name], 1 + len(in_dims)
        assert adapter_axes[sub][name]["a"] == (*axes[:n_in], None)
        assert adapter_axes[sub][name]["b"] == (axes[0], None, *axes[n_in:])


def test_remat_and_dropout_gradients(base):
    """Dropout keys travel through nn.scan and nn.remat: gradients with remat equal those without."""
    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3, target_modules=SUBSET)
    adapters = _random_adapters(config, lora_config, seed=23)
    ids, mask = _ids(config.vocab_size, seed=11)

    def grads(options):
        def loss(ad):
            wrapped = lora.apply(params, ad, lora_config, jax.random.key(5))
            return jnp.sum(forward_outputs(config, wrapped, ids, mask, options=options)["logits"] ** 2) / 1e4

        return jax.grad(loss)(adapters)

    plain, remat = grads(RunOptions()), grads(RunOptions(remat="full"))
    for g, r in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        assert np.max(np.abs(np.asarray(r))) > 0 and rel_err(np.asarray(g), np.asarray(r)) <= GRAD_TOL


def test_mismatched_adapters_are_refused(base):
    """apply / merge / save: adapters that do not fit the config or the params are one-line ValueErrors."""
    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, target_modules=SUBSET)
    adapters = _random_adapters(config, lora_config)
    with pytest.raises(ValueError, match="missing adapter self_attn/k_kernel"):
        lora.apply(params, adapters, lora.LoraConfig(rank=4, target_modules=(*SUBSET, "k_proj")))
    with pytest.raises(ValueError, match="unexpected adapter mlp/down_kernel"):
        lora.merge(params, adapters, lora.LoraConfig(rank=4, target_modules=("q_proj", "v_proj")), config)
    deeper = config.replace(num_hidden_layers=4, layer_types=config.layer_types + config.layer_types[:1])
    with pytest.raises(ValueError, match=r"adapter mlp/down_kernel/a has shape \[3, 96, 4\], expected \[4, 96, 4\]"):
        save_peft_adapter("unused", deeper, lora_config, adapters)
    two_layers = jax.tree.map(lambda x: x[:2], adapters)
    with pytest.raises(ValueError, match=r"adapters for 2 layers do not fit these params \(3 dense layers\)"):
        lora.apply(params, two_layers, lora_config)
    with pytest.raises(ValueError, match="cannot merge LoRA into int8 params"):
        lora.merge(quantize_params(config, params), adapters, lora_config, config)
    with pytest.raises(ValueError, match="unknown lora target module 'lm_head'"):
        lora.LoraConfig(target_modules=("q_proj", "lm_head"))
    assert not os.path.exists("unused")


@pytest.mark.parametrize("in_first", [True, False])
def test_int8_digits_gradient_is_the_dequantized_products(in_first):
    """The int8 'digits' form (few rows) differentiates as its dequantized product: for a linear
    loss, the same activation and scale gradients (autodiff of its rounding was 6.8x off)."""
    w = np.random.RandomState(0).randn(*((64, 32) if in_first else (32, 64))).astype(np.float32)
    q = quantize_int8(jnp.asarray(w), (0,) if in_first else (1,))
    rng = np.random.RandomState(1)
    x, cot = jnp.asarray(rng.randn(2, 64).astype(np.float32)), jnp.asarray(rng.randn(2, 32).astype(np.float32))

    def grads(form):
        return jax.grad(lambda x, s: jnp.sum(int8_dot(x, q.values, s, in_first, form) * cot), argnums=(0, 1))(
            x, q.scale
        )

    for got, want in zip(grads("digits"), grads("dequantize")):
        assert rel_err(np.asarray(got), np.asarray(want)) <= 1e-6


# 2 tokens: every product in the int8 'digits' form, whose 16-bit activations differ from float32's
# (measured 4.4e-4 relative in the gradients; 1.16 before the form had its custom gradient)
@pytest.mark.parametrize("rows, tol", [(24, GRAD_TOL), (2, 2e-3)], ids=["dequantize-form", "digits-form"])
def test_int8_base_adapter_gradients(base, rows, tol):
    """QLoRA-style: adapter gradients over an int8 base == over its dequantized float32 kernels, with
    training-sized products and with products of so few rows that they take the int8 'digits' form
    (see qwen2_jax.matmul)."""
    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(config, lora_config, seed=25)
    quantized = quantize_params(config, params)
    ids, mask = _ids(config.vocab_size, seed=12)
    if rows == 2:
        ids, mask = ids[:1, :2], mask[:1, :2]

    def grads(p):
        def loss(ad):
            return jnp.sum(forward_outputs(config, lora.apply(p, ad, lora_config), ids, mask)["logits"] ** 2) / 1e4

        return jax.grad(loss)(adapters)

    for g, r in zip(jax.tree.leaves(grads(quantized)), jax.tree.leaves(grads(_dequantized(config, quantized)))):
        assert np.max(np.abs(np.asarray(r))) > 0 and rel_err(np.asarray(g), np.asarray(r)) <= tol


def test_generator_with_unmerged_adapters(base):
    """Generator(lora=...) (prefill + cached decode, generation's layout, adapters unmerged) gives
    the tokens and logits of the merged model."""
    from qwen2_jax.generate import GenerateOptions, Generator

    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(config, lora_config, seed=27)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    opts = GenerateOptions(8, temperature=0.0)
    unmerged = Generator(config, params, lora=(lora_config, adapters))
    merged = Generator(config, lora.merge(params, adapters, lora_config, config))
    got, want = unmerged.generate_outputs(prompts, opts, True), merged.generate_outputs(prompts, opts, True)
    assert got["tokens"] == want["tokens"] and got["tokens"] != Generator(config, params).generate(prompts, opts)
    for g, w in zip(got["logits"], want["logits"]):
        assert rel_err(np.asarray(g), np.asarray(w)) <= TOL


def test_generator_with_adapters_on_int8(base):
    """Generator(quantize="int8", lora=...): an int8 base with float32 adapters (not the merged model
    quantized). Its first token's logits == the uncached forward of the same params + adapters."""
    from qwen2_jax.generate import GenerateOptions, Generator

    _, _, config, params = base
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(config, lora_config, seed=29)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]]  # >= 5 rows: the int8 products' dequantize form
    got = Generator(config, params, quantize="int8", lora=(lora_config, adapters))
    out = got.generate_outputs(prompts, GenerateOptions(4, temperature=0.0), True)
    wrapped = lora.apply(quantize_params(config, params), adapters, lora_config)
    for row, prompt in enumerate(prompts):
        want = np.asarray(forward(config, wrapped, [prompt]))[0, -1]
        assert rel_err(np.asarray(out["logits"][row][0]), want) <= TOL
