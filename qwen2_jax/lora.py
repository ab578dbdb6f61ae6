"""LoRA as a parameter transform: the adapter pytree, `apply` (adapters beside the base kernels, for
the one forward pass) and `merge` (W + scale * A @ B).

Adapters mirror the checkpoint's stacked params: for each targeted kernel, `a` [layers, *in, r] and
`b` [layers, r, *out], where in/out are the kernel's own [in, out] dims (q_kernel [d, n, h]: a [L,
d, r], b [L, r, n, h]; o_kernel [n, h, d]: a [L, n, h, r], b [L, r, d]), under the kernel's path:
adapters["layers"]["self_attn"]["q_kernel"] = {"a", "b"}. Target modules go by peft's names
(q_proj ... down_proj), so a `LoraConfig` reads as peft's.

`apply(params, adapters, lora_config)` returns params with a `LoraAdapter` beside each targeted
kernel (`q_kernel_lora` next to `q_kernel`); `qwen2_jax.layers.kernel` picks it up and `project`
adds scale * (dropout(x) @ a) @ b to the base product. Params without adapters run today's program
unchanged, and the model has no LoRA switch: the base is the base, params+adapters are the adapted
model (a DPO reference is the base params, no second copy). Works on bfloat16, float32 or int8
(`Int8Kernel`) bases in either kernel layout: the adapter product does not touch the base kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.sharding import ShardingContext, shardings_for

# peft module name -> (sublayer, our kernel name). Canonical order: HF's order inside a layer.
TARGETS = {
    "q_proj": ("self_attn", "q_kernel"),
    "k_proj": ("self_attn", "k_kernel"),
    "v_proj": ("self_attn", "v_kernel"),
    "o_proj": ("self_attn", "o_kernel"),
    "gate_proj": ("mlp", "gate_kernel"),
    "up_proj": ("mlp", "up_kernel"),
    "down_proj": ("mlp", "down_kernel"),
}
TARGET_MODULES = tuple(TARGETS)
ADAPTER_SUFFIX = "_lora"  # params[...]["q_kernel_lora"]: the adapter `apply` places beside q_kernel
STACKED = "layers"  # the stacked params subtree of a dense model (one segment)
_RANK = "r"  # the rank's einsum letter; no kernel spec in layers.py uses it


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, dropout on the adapter input (training only), target modules (peft names),
    rslora (scale alpha / sqrt(r) instead of alpha / r; off, as peft's default)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        modules = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        unknown = [m for m in modules if m not in TARGETS]
        if unknown:
            raise ValueError(f"unknown lora target module {unknown[0]!r} (choose from {', '.join(TARGET_MODULES)})")
        if not modules:
            raise ValueError("lora target_modules is empty")
        object.__setattr__(self, "target_modules", tuple(m for m in TARGET_MODULES if m in modules))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def kernel_dims(config: Qwen2Config) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """peft module name -> (input dims, output dims) of its kernel in [in, out] terms."""
    d, n, k, h, f = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_size,
        config.intermediate_size,
    )
    return {
        "q_proj": ((d,), (n, h)),
        "k_proj": ((d,), (k, h)),
        "v_proj": ((d,), (k, h)),
        "o_proj": ((n, h), (d,)),
        "gate_proj": ((d,), (f,)),
        "up_proj": ((d,), (f,)),
        "down_proj": ((f,), (d,)),
    }


# The kernels' logical axes split as kernel_dims splits their shapes (a sharded run's adapters
# follow their base kernel's input / output sharding; the rank axis is replicated).
_KERNEL_AXES = {
    "q_proj": (("embed",), ("q_heads", "head_dim")),
    "k_proj": (("embed",), ("kv_heads", "head_dim")),
    "v_proj": (("embed",), ("kv_heads", "head_dim")),
    "o_proj": (("q_heads", "head_dim"), ("embed",)),
    "gate_proj": (("embed",), ("mlp",)),
    "up_proj": (("embed",), ("mlp",)),
    "down_proj": (("mlp",), ("embed",)),
}


def check_supported(config: Qwen2Config) -> None:
    if config.is_moe:
        raise ValueError("LoRA adapters are supported for dense Qwen2 models only, not Qwen2-MoE")


def adapter_shapes(config: Qwen2Config, lora_config: LoraConfig) -> dict:
    """The adapter tree's leaf shapes: {"layers": {sublayer: {kernel: {"a": .., "b": ..}}}}."""
    check_supported(config)
    num_layers, r, dims = config.num_hidden_layers, lora_config.rank, kernel_dims(config)
    tree: dict = {}
    for module in lora_config.target_modules:
        sub, name = TARGETS[module]
        in_dims, out_dims = dims[module]
        tree.setdefault(sub, {})[name] = {"a": (num_layers, *in_dims, r), "b": (num_layers, r, *out_dims)}
    return {STACKED: tree}


def adapter_logical_axes(lora_config: LoraConfig) -> dict:
    """Logical axis names of every adapter leaf (same tree as `adapter_shapes`)."""
    tree: dict = {}
    for module in lora_config.target_modules:
        sub, name = TARGETS[module]
        in_axes, out_axes = _KERNEL_AXES[module]
        tree.setdefault(sub, {})[name] = {"a": ("layers", *in_axes, None), "b": ("layers", None, *out_axes)}
    return {STACKED: tree}


def init_adapters(config: Qwen2Config, lora_config: LoraConfig, rng, dtype=jnp.float32) -> dict:
    """Fresh adapters as peft initialises them: a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
    kaiming_uniform_ with a=sqrt(5), fan_in = the kernel's input size), b = 0 (so the adapted model
    starts equal to the base)."""
    shapes = adapter_shapes(config, lora_config)
    leaves = [(sub, name, ab) for sub, kernels in shapes[STACKED].items() for name, ab in kernels.items()]
    keys = jax.random.split(rng, len(leaves))
    tree: dict = {}
    for key, (sub, name, ab) in zip(keys, leaves):
        fan_in = math.prod(ab["a"][1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, ab["a"], jnp.float32, -bound, bound).astype(dtype)
        tree.setdefault(sub, {})[name] = {"a": a, "b": jnp.zeros(ab["b"], dtype)}
    return {STACKED: tree}


def abstract_adapters(config: Qwen2Config, lora_config: LoraConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of `init_adapters`' result (nothing allocated)."""
    return jax.eval_shape(lambda k: init_adapters(config, lora_config, k, dtype), jax.random.key(0))


def adapter_shardings(config: Qwen2Config, lora_config: LoraConfig, mesh, dtype=jnp.float32) -> dict:
    """NamedShardings of the adapter tree on `mesh`, by the one logical rules table."""
    abstract = abstract_adapters(config, lora_config, dtype)
    return shardings_for(ShardingContext(mesh), adapter_logical_axes(lora_config), abstract)


def _check_targets(adapters, lora_config: LoraConfig) -> None:
    """One-line ValueError unless `adapters` holds exactly lora_config's target kernels."""
    got = adapters.get(STACKED) if isinstance(adapters, dict) else None
    if not isinstance(got, dict):
        raise ValueError(f"adapters must be a dict with a {STACKED!r} subtree")
    want_paths = {TARGETS[m] for m in lora_config.target_modules}
    got_paths = {(sub, name) for sub, kernels in got.items() if isinstance(kernels, dict) for name in kernels}
    if want_paths != got_paths:
        extra, missing = sorted(got_paths - want_paths), sorted(want_paths - got_paths)
        what = f"unexpected adapter {'/'.join(extra[0])}" if extra else f"missing adapter {'/'.join(missing[0])}"
        raise ValueError(f"{what} for target modules {', '.join(lora_config.target_modules)}")


def check_adapters(config: Qwen2Config, lora_config: LoraConfig, adapters) -> None:
    """One-line ValueError unless `adapters` has exactly the tree and shapes this config implies."""
    expected = adapter_shapes(config, lora_config)
    _check_targets(adapters, lora_config)
    got = adapters[STACKED]
    for sub, name in sorted(TARGETS[m] for m in lora_config.target_modules):
        for ab in ("a", "b"):
            want = expected[STACKED][sub][name][ab]
            leaf = got[sub][name].get(ab) if isinstance(got[sub][name], dict) else None
            shape = tuple(getattr(leaf, "shape", ()))
            if leaf is None or shape != want:
                raise ValueError(f"adapter {sub}/{name}/{ab} has shape {list(shape)}, expected {list(want)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One kernel's adapter as the forward pass sees it: a [*in, r], b [r, *out] (with a leading
    layers axis until nn.scan slices it), a dropout key (None: no dropout), and the static scale
    and dropout rate."""

    a: Any
    b: Any
    dropout_key: Any
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))


class LoraKernel(NamedTuple):
    """A base kernel (float array or Int8Kernel) with its adapter: what `layers.kernel` returns."""

    base: Any
    adapter: LoraAdapter


def apply(params: dict, adapters: dict, lora_config: LoraConfig, dropout_rng=None) -> dict:
    """params with each targeted kernel's LoraAdapter beside it, for `Qwen2ForCausalLM.apply` (and
    so `forward`, a loss, a train step). dropout_rng: a key for dropout on the adapter inputs
    (training); None runs without dropout (inference). Takes stacked ("layers") or per-layer
    ("layer_0", ...) params, in either kernel layout and any base dtype; the params are not copied."""
    targets = [TARGETS[m] for m in lora_config.target_modules]
    _check_targets(adapters, lora_config)
    stacked = adapters[STACKED]
    num_layers = stacked[targets[0][0]][targets[0][1]]["a"].shape[0]
    if STACKED in params:
        layer_names, params_layers = [STACKED], params[STACKED][targets[0][0]][targets[0][1]].shape[0]
    else:
        layer_names = [f"layer_{i}" for i in range(num_layers)]
        params_layers = sum(1 for k in params if k.startswith("layer_"))
    if params_layers != num_layers or not all(name in params for name in layer_names):
        raise ValueError(f"adapters for {num_layers} layers do not fit these params ({params_layers} dense layers)")
    use_dropout = dropout_rng is not None and lora_config.dropout > 0
    keys = jax.random.split(dropout_rng, (len(targets), num_layers)) if use_dropout else None
    out = dict(params)
    for i, layer_name in enumerate(layer_names):
        per_layer = layer_name != STACKED
        layer = out[layer_name] = dict(params[layer_name])
        for t, (sub, name) in enumerate(targets):
            ab = stacked[sub][name]
            a, b = (ab["a"][i], ab["b"][i]) if per_layer else (ab["a"], ab["b"])
            key = None if keys is None else (keys[t, i] if per_layer else keys[t])
            layer[sub] = dict(layer[sub]) if layer[sub] is params[layer_name][sub] else layer[sub]
            layer[sub][name + ADAPTER_SUFFIX] = LoraAdapter(a, b, key, lora_config.scale, lora_config.dropout)
    return out


def adapter_product(y, x, adapter: LoraAdapter, in_out_spec: str):
    """y + scale * (dropout(x) @ a) @ b, for the kernel product y = einsum(in_out_spec, x, W).

    Computed in the adapters' dtype (float32 by default) whatever the compute dtype, then added to
    y in float32 and cast to y's dtype, as peft does (it casts x to lora_A's dtype): at the start
    of training b @ a is tiny next to W, and in bfloat16 both the update and its gradients would
    round away. It costs 2 r (in + out) flops per token against in * out for the base product."""
    inputs, out = in_out_spec.split("->")
    x_spec, w_spec = inputs.split(",")
    if _RANK in in_out_spec:
        raise ValueError(f"einsum {in_out_spec!r} already uses the rank letter {_RANK!r}")
    n_in = adapter.a.ndim - 1
    w_in, w_out = w_spec[:n_in], w_spec[n_in:]
    x_free = "".join(c for c in x_spec if c not in w_in)
    dtype = jnp.promote_types(adapter.a.dtype, adapter.b.dtype)
    x = x.astype(dtype)
    if adapter.dropout_key is not None and adapter.dropout > 0:
        keep = 1.0 - adapter.dropout
        x = jnp.where(jax.random.bernoulli(adapter.dropout_key, keep, x.shape), x / keep, 0).astype(dtype)
    xa = jnp.einsum(f"{x_spec},{w_in}{_RANK}->{x_free}{_RANK}", x, adapter.a)
    delta = jnp.einsum(f"{x_free}{_RANK},{_RANK}{w_out}->{out}", xa, adapter.b)
    return (y.astype(jnp.float32) + adapter.scale * delta.astype(jnp.float32)).astype(y.dtype)


def delta_weight(a, b, scale: float):
    """scale * a @ b in float32: a [L, *in, r], b [L, r, *out] -> [L, *in, *out]."""
    ins, outs = "ijk"[: a.ndim - 2], "mnp"[: b.ndim - 2]
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a32, b32) * scale


def merge(params: dict, adapters: dict, lora_config: LoraConfig, config: Qwen2Config) -> dict:
    """Plain params with every targeted kernel W replaced by W + scale * a @ b (float32 sum, rounded
    to W's dtype). Takes the checkpoint layout (stacked layers, [in, out] float kernels); an int8
    base is refused (merge into the unquantized base, then quantize)."""
    check_adapters(config, lora_config, adapters)
    if STACKED not in params:
        raise ValueError("merge needs params in the checkpoint layout (stacked 'layers')")
    out = dict(params)
    layers = out[STACKED] = dict(params[STACKED])
    for module in lora_config.target_modules:
        sub, name = TARGETS[module]
        layers[sub] = dict(layers[sub]) if layers[sub] is params[STACKED][sub] else layers[sub]
        if name + "_scale" in layers[sub]:
            raise ValueError("cannot merge LoRA into int8 params: merge into the unquantized base, then quantize")
        w = layers[sub][name]
        ab = adapters[STACKED][sub][name]
        delta = delta_weight(ab["a"], ab["b"], lora_config.scale)
        if w.shape != delta.shape:
            raise ValueError(f"{sub}/{name} has shape {list(w.shape)}, the adapter implies {list(delta.shape)}")
        layers[sub][name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out
