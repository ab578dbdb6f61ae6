"""MoE upcycling: the first parameters of a Qwen2-MoE model made from a dense Qwen2 checkpoint, as the
Qwen2 report initialises Qwen2-57B-A14B from Qwen2-7B (`init.upcycle_from` in qwen2-train's config).

The mapping, per decoder layer (I: the dense FFN's intermediate size, E routed experts of width f,
S: the shared expert's width; kernels in the checkpoint's [in, out] layout):

Routed experts. The dense FFN is replicated C = ceil(E*f / I) times; copy c has its intermediate
channels permuted by its own permutation pi_c (drawn from the run's seed and the layer index; the
identity when `init.upcycle_shuffle` is false), and the copies are laid end to end into a stream of
C*I channels: stream position p holds dense channel pi_{p // I}(p mod I). Expert e takes the
consecutive (so wrapping over the dense width) positions [e*f, (e+1)*f): its channel j is dense
channel ch(e, j) = pi_{(e*f + j) // I}((e*f + j) mod I), meaning its gate and up columns are the dense
gate and up columns ch(e, j) and its down row is the dense down row ch(e, j). The stream past E*f is
dropped (when E*f < I the dense channels past E*f reach no expert). Each copy's own shuffle is what
makes experts cut from different copies differ, as the report puts it.
Then round(`init.upcycle_reinit_fraction` * f) of each expert's channels, chosen at random (seeded,
per layer and expert), take the model's fresh init instead (normal(initializer_range)) in all three
of gate, up and down: the report re-initialises 50% of each fine-grained expert.

Shared expert. Channel j is dense channel j mod I: the first S channels when S <= I, the dense FFN
tiled when S > I. Its gate and up columns are copied; its down row is the dense row times 2 / n_j,
n_j being how many shared channels hold that dense channel (1 when S <= I). The shared-expert gate
kernel is zero, so sigmoid(x . 0) = 1/2 for every token and the shared expert contributes exactly the
dense FFN (S >= I), or its first S channels (S < I). Doubling the down rows rather than pushing the
gate towards 1 keeps the gate in sigmoid's linear range, where it learns, and is exact in binary
floating point.

Router: the fresh init (normal(initializer_range)), as when training from scratch. Attention, the
norms, the embedding, the LM head and the MLPs of dense layers (mlp_only_layers) are copied.

So at step 0 each sparse layer's MLP is the dense FFN plus the routed experts' output. The exact case
tests/test_train_upcycle.py holds: with no reinit, no shuffle, E*f = I, the router kernel zero
(softmax 1/E for every expert), k = E: every expert is selected with weight 1/E, the experts
partition the dense channels, so routed = (1/E) * sum_e expert_e(x) = (1/E) * FFN(x) and the MLP
output is (1 + 1/E) * FFN(x): the dense model with its down kernels scaled by 1 + 1/E.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.checkpoint import is_hf_dir, load_checkpoint
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.orbax_checkpoint import is_orbax_checkpoint, open_checkpoint
from train.config import ConfigKeyError, InitSection, TrainConfig

# The dense checkpoint and the MoE model must agree on these (everything but the MLP's shape).
MATCHING_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_size",
    "tie_word_embeddings",
    "qkv_bias",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
)


# ------------------------------------------------------------------------------------- checking
def dense_config_of(path: str) -> Qwen2Config:
    """The architecture of the dense checkpoint at `path` (HF or Orbax), without loading its arrays."""
    if not os.path.isdir(path):
        raise ConfigKeyError(f"config key 'init.upcycle_from': {path} is not a directory")
    if is_orbax_checkpoint(path):
        return open_checkpoint(path).config
    if is_hf_dir(path):
        return Qwen2Config.from_hf(path)
    raise ConfigKeyError(f"config key 'init.upcycle_from': {path} is neither an HF nor a qwen2-jax Orbax checkpoint")


def check_architectures(dense: Qwen2Config, moe: Qwen2Config, where: str) -> None:
    """ConfigError naming the first field on which the dense checkpoint cannot seed the MoE model."""
    if dense.is_moe:
        raise ConfigError(f"{where}: the checkpoint is already a MoE model (num_experts {dense.num_experts})")
    if not moe.is_moe:
        raise ConfigError(
            f"{where}: the model to train is dense; upcycling needs a qwen2_moe model with num_experts > 0"
        )
    fields = MATCHING_FIELDS
    if any(not moe.is_sparse_layer(i) for i in range(moe.num_hidden_layers)):
        fields += ("intermediate_size",)  # the MoE model's dense layers take the dense MLP as it is
    for field in fields:
        a, b = getattr(dense, field), getattr(moe, field)
        if a != b:
            raise ConfigError(f"{where}: the dense checkpoint's {field} is {a}, the MoE model's {b} (they must agree)")


def check_run(config: TrainConfig, model_checkpoint: str | None, moe: Qwen2Config) -> None:
    """Before anything heavy: the config can upcycle (no-op without init.upcycle_from)."""
    path = config.init.upcycle_from
    if not path:
        return
    if model_checkpoint:
        raise ConfigKeyError(
            f"config key 'init.upcycle_from' starts a fresh MoE model, but model {config.model!r} is a checkpoint "
            "to continue from (give a preset or config.json, with model_overrides)"
        )
    if config.lora.rank > 0 or config.task == "dpo":
        raise ConfigKeyError("config key 'init.upcycle_from' is for full training (no lora.rank, task not dpo)")
    check_architectures(dense_config_of(path), moe, f"init.upcycle_from {path}")


# ------------------------------------------------------------------------------------------ plan
def expert_channels(intermediate: int, experts: int, width: int, rng: np.random.Generator | None) -> np.ndarray:
    """[E, f] dense channel of each expert channel: consecutive slices of the (shuffled) copies."""
    copies = -(-experts * width // intermediate)
    stream = [rng.permutation(intermediate) if rng is not None else np.arange(intermediate) for _ in range(copies)]
    return np.concatenate(stream)[: experts * width].reshape(experts, width).astype(np.int32)


def reinit_mask(experts: int, width: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[E, f] True where an expert channel is re-initialised: the same count in every expert."""
    count = int(math.floor(fraction * width + 0.5))
    mask = np.zeros((experts, width), bool)
    for e in range(experts):
        mask[e, rng.choice(width, count, replace=False)] = True
    return mask


def shared_channels(intermediate: int, shared: int) -> tuple[np.ndarray, np.ndarray]:
    """([S] dense channel of each shared-expert channel, [S] its down-row scale): with the gate's 1/2
    the shared expert sums to the dense FFN (S >= I) or its first S channels (S < I)."""
    channels = np.arange(shared) % intermediate
    copies = np.bincount(channels, minlength=intermediate)[channels]
    return channels.astype(np.int32), (2.0 / copies).astype(np.float32)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["channels", "reinit", "shared_channels", "shared_scale"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Plan:
    """The index arrays of one upcycling: per layer segment, [layers, E, f] channels and reinit mask."""

    channels: dict[str, np.ndarray]
    reinit: dict[str, np.ndarray]
    shared_channels: np.ndarray
    shared_scale: np.ndarray


def make_plan(dense: Qwen2Config, moe: Qwen2Config, init: InitSection, seed: int) -> Plan:
    """Every random choice of the upcycling, from the run's seed and each layer's index."""
    num_i, num_e, width = dense.intermediate_size, moe.num_experts, moe.moe_intermediate_size
    channels, reinit = {}, {}
    for name, layers in moe.layer_segments():
        if not moe.is_sparse_layer(layers[0]):
            continue
        per_layer = [np.random.default_rng([seed, layer]) for layer in layers]
        channels[name] = np.stack(
            [expert_channels(num_i, num_e, width, rng if init.upcycle_shuffle else None) for rng in per_layer]
        )
        reinit[name] = np.stack([reinit_mask(num_e, width, init.upcycle_reinit_fraction, rng) for rng in per_layer])
    shared, scale = shared_channels(num_i, moe.shared_expert_intermediate_size)
    return Plan(channels, reinit, shared, scale)


# ------------------------------------------------------------------------------------- the params
def _routed_experts(dense_mlp, fresh_experts, channels_lef, reinit_lef):
    """Stacked expert kernels [l, E, d, f] / [l, E, f, d] cut from the dense [l, d, I] / [l, I, d]."""

    def one_layer(gate_di, up_di, down_id, ch_ef):
        return jnp.moveaxis(gate_di[:, ch_ef], 1, 0), jnp.moveaxis(up_di[:, ch_ef], 1, 0), down_id[ch_ef]

    gate, up, down = jax.vmap(one_layer)(
        dense_mlp["gate_kernel"], dense_mlp["up_kernel"], dense_mlp["down_kernel"], channels_lef
    )
    in_columns, in_rows = reinit_lef[:, :, None, :], reinit_lef[:, :, :, None]

    def keep_fresh_where(mask, name, copied):
        fresh = fresh_experts[name]
        return jnp.where(mask, fresh, copied.astype(fresh.dtype))

    return {
        "gate_kernel": keep_fresh_where(in_columns, "gate_kernel", gate),
        "up_kernel": keep_fresh_where(in_columns, "up_kernel", up),
        "down_kernel": keep_fresh_where(in_rows, "down_kernel", down),
    }


def _shared_expert(dense_mlp, fresh_shared, channels_s, scale_s):
    dtype = fresh_shared["down_kernel"].dtype
    down = dense_mlp["down_kernel"][:, channels_s, :] * scale_s[None, :, None].astype(dtype)
    return {
        "gate_kernel": dense_mlp["gate_kernel"][:, :, channels_s].astype(dtype),
        "up_kernel": dense_mlp["up_kernel"][:, :, channels_s].astype(dtype),
        "down_kernel": down.astype(dtype),
    }


def _copy_like(dense_tree, fresh_tree):
    """The dense values in the fresh tree's dtypes; ConfigError where a shape differs."""

    def one(path, d, f):
        if d.shape != f.shape:
            raise ConfigError(
                f"upcycling: {jax.tree_util.keystr(path)} is {d.shape} in the dense model, {f.shape} here"
            )
        return d.astype(f.dtype)

    return jax.tree_util.tree_map_with_path(one, dense_tree, fresh_tree)


def upcycle_params(dense_config: Qwen2Config, dense_params, moe_config: Qwen2Config, fresh_params, plan: Plan):
    """The MoE params: `fresh_params` (the MoE model's own init) overwritten from the dense params as the
    module docstring says. Pure and jit-able; both trees in the checkpoint layout (stacked layers)."""
    out = {key: value for key, value in fresh_params.items()}
    for key in ("embed_tokens", "norm", "lm_head"):
        if key in fresh_params:
            out[key] = _copy_like(dense_params[key], fresh_params[key])
    dense_layers = dense_params["layers"]
    for name, layers in moe_config.layer_segments():
        first, last = layers[0], layers[-1] + 1
        dense_seg = jax.tree.map(lambda a, first=first, last=last: a[first:last], dense_layers)
        fresh_seg = fresh_params[name]
        seg = {key: _copy_like(dense_seg[key], value) for key, value in fresh_seg.items() if key != "mlp"}
        if name not in plan.channels:  # a dense layer of the MoE model
            seg["mlp"] = _copy_like(dense_seg["mlp"], fresh_seg["mlp"])
        else:
            fresh_mlp = fresh_seg["mlp"]
            mlp = dict(fresh_mlp)  # router_kernel: the fresh init
            mlp["experts"] = _routed_experts(
                dense_seg["mlp"], fresh_mlp["experts"], plan.channels[name], plan.reinit[name]
            )
            if "shared_expert" in fresh_mlp:
                mlp["shared_expert"] = _shared_expert(
                    dense_seg["mlp"], fresh_mlp["shared_expert"], plan.shared_channels, plan.shared_scale
                )
                mlp["shared_expert_gate_kernel"] = jnp.zeros_like(fresh_mlp["shared_expert_gate_kernel"])
            seg["mlp"] = mlp
        out[name] = seg
    return out


def upcycled_params(setup, init: InitSection, seed: int):
    """The trainer's starting params: the dense checkpoint and the MoE model's fresh init (seed), each
    placed in its own shardings on the run's mesh, combined by one jitted function straight into the MoE
    model's shardings."""
    dense_config, dense = load_checkpoint(init.upcycle_from, dtype=setup.param_dtype.name, mesh=setup.mesh)
    check_architectures(dense_config, setup.config, f"init.upcycle_from {init.upcycle_from}")
    plan = make_plan(dense_config, setup.config, init, seed)
    fresh = setup.init_params(seed)
    combine = jax.jit(
        lambda d, f, p: upcycle_params(dense_config, d, setup.config, f, p),
        out_shardings=setup.param_shardings(),
        donate_argnums=(1,),  # the fresh init: only its router and re-initialised channels survive
    )
    return combine(dense, fresh, plan)
