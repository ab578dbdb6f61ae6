"""Everything the trainer needs from the model library, in one place.

Resolving the `model` key (preset, config.json, or checkpoint to continue from), the mesh, abstract
parameters and their shardings, fresh initialisation straight into those shardings, loading a
checkpoint into them, and the two halves of the forward pass that the chunked loss needs: the decoder
trunk up to the final norm, and the LM head weight. Nothing else in `train/` imports model internals.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen2_jax.checkpoint import is_hf_dir, load_checkpoint
from qwen2_jax.config import ConfigError, Qwen2Config, preset
from qwen2_jax.dtypes import PARAM_DTYPES
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask, positions_from_segments, vocab_logits
from qwen2_jax.moe import load_balancing_loss, router_z_loss
from qwen2_jax.options import RunOptions
from qwen2_jax.orbax_checkpoint import is_orbax_checkpoint, params_handler, params_save_args, write_checkpoint_files
from qwen2_jax.params import abstract_params, init_params, param_shardings
from qwen2_jax.sequence_parallel import AXIS as SEQUENCE_AXIS
from qwen2_jax.sequence_parallel import from_zigzag, to_zigzag
from qwen2_jax.sharding import MESH_AXES, ShardingContext, ShardingError, make_mesh


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What the `model` key resolved to: an architecture, and a checkpoint when continuing from one."""

    config: Qwen2Config
    checkpoint: str | None  # HF or Orbax directory to load parameters from; None = fresh init


def resolve_model(spec: str, overrides: dict[str, Any] | None = None) -> ModelSource:
    """A preset name, a config.json path, or a checkpoint directory (HF or Orbax)."""
    overrides = dict(overrides or {})
    if os.path.isdir(spec):
        if not (is_hf_dir(spec) or is_orbax_checkpoint(spec)):
            raise ConfigError(f"model {spec!r}: a directory but neither an HF checkpoint nor a qwen2-jax Orbax one")
        if overrides:
            raise ConfigError(f"model_overrides apply to a fresh model only; {spec!r} is a checkpoint")
        from qwen2_jax.orbax_checkpoint import open_checkpoint

        config = open_checkpoint(spec).config if is_orbax_checkpoint(spec) else Qwen2Config.from_hf(spec)
        return ModelSource(config, spec)
    if spec.endswith(".json") or os.path.sep in spec:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model config not found: {spec}")
        config = Qwen2Config.from_hf(spec)
    else:
        config = preset(spec)
    if overrides:
        hf = config.to_hf()
        hf.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
        if "layer_types" not in overrides:
            hf.pop("layer_types", None)  # derived again for the new depth
        if "rope_theta" in overrides:
            hf["rope_parameters"] = {**hf.get("rope_parameters", {}), "rope_theta": overrides["rope_theta"]}
        config = Qwen2Config.from_hf(hf)
    return ModelSource(config, None)


def build_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """Mesh over all devices of all processes (or the given ones, e.g. a TPU topology's compile-only
    devices); ShardingError when the sizes do not fit the device count."""
    return make_mesh(**{a: sizes.get(a, 1) for a in MESH_AXES}, devices=devices)


def batch_axes_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (the `batch` rule: data, fsdp, expert)."""
    ctx = ShardingContext(mesh)
    spec = ctx.spec(("batch",))
    axes = spec[0] if isinstance(spec[0], tuple) else ((spec[0],) if spec[0] else ())
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Sharding of an input batch [batch, length, ...]: the batch over the data-parallel axes."""
    return ShardingContext(mesh).sharding(("batch",) + ("length",) + (None,) * (rank - 2))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


class ModelSetup:
    """A model on a mesh: shapes, shardings, init/load, and the pure functions the loss needs."""

    def __init__(
        self,
        config: Qwen2Config,
        mesh: Mesh,
        *,
        dtype: str = "float32",
        param_dtype: str = "float32",
        remat: str = "none",
        scan_unroll: int = 1,
        moe_impl: str = "auto",
        moe_exchange: str = "auto",
        quantize: str | None = None,
    ):
        self.config = config
        self.mesh = mesh
        self.sharding = ShardingContext(mesh)
        # the checkpoint layout (stacked layers, [in, out] kernels): what training saves and restores
        self.options = RunOptions(
            dtype=PARAM_DTYPES[dtype],
            param_dtype=PARAM_DTYPES[param_dtype],
            remat=remat,
            scan_unroll=scan_unroll,
            moe_impl=moe_impl,
            moe_exchange=moe_exchange,
            quantize=quantize,  # "int8": a frozen LoRA base's kernels (train/lora_setup.py)
            sharding=self.sharding,
        )
        self.param_dtype = self.options.param_dtype
        self.dtype = self.options.compute_dtype
        self.module = Qwen2ForCausalLM(config, self.options)
        # context parallelism: rows split over this many devices, in zig-zag order inside the model
        self.sequence_shards = mesh.shape.get(SEQUENCE_AXIS, 1)

    @property
    def is_moe(self) -> bool:
        cfg = self.config
        return cfg.num_experts > 0 and any(cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))

    # ------------------------------------------------------------------------------------ params
    def abstract_params(self):
        return abstract_params(self.config, self.param_dtype, self.options)

    def param_shardings(self):
        return param_shardings(self.config, self.mesh, self.param_dtype, self.options)

    def init_params(self, seed: int):
        """Fresh parameters (HF's init), each created on its devices by a jitted init with out_shardings."""
        return init_params(self.config, jax.random.key(seed), self.mesh, self.param_dtype, self.options)

    def load_params(self, path: str):
        """Parameters of a checkpoint (HF or Orbax), restored straight into their shardings."""
        config, params = load_checkpoint(path, dtype=self.param_dtype.name, mesh=self.mesh)
        if config != self.config:
            raise ConfigError(f"{path}: its config.json differs from the model being trained")
        return params

    def write_checkpoint_files(self, directory: str, source: str, assets_from: str | None = None) -> None:
        """config.json and the metadata file that make a training checkpoint loadable by load_checkpoint,
        and the tokenizer / generation assets of `assets_from` (a checkpoint directory) when given."""
        write_checkpoint_files(directory, self.config, self.param_dtype.name, source, assets_from=assets_from)

    # ------------------------------------------------------------------------------- the forward
    def trunk(self, params, input_ids_bt, attention_mask_bt, rng=None, segment_ids_bt=None):
        """(final normed hidden states [b, t, d], router logits per sparse layer): the model without its
        LM head, which the chunked loss applies itself. rng feeds the "dropout" stream (Qwen2 has no
        dropout in training today; the stream is there so a model that gains one gets its key).
        segment_ids_bt: packed rows (several documents per row, 0 = padding): attention stays inside
        each document and positions restart at its first token. On a mesh with a sequence axis the
        hidden states come back in zig-zag order (`to_sequence_order`: what the loss's targets need)."""
        if segment_ids_bt is None:
            positions_bt = positions_from_mask(attention_mask_bt)
        else:
            positions_bt = positions_from_segments(segment_ids_bt)
        parallel = self.sequence_shards > 1
        if parallel:  # positions and masks from the row order above, then every input permuted alike
            input_ids_bt, attention_mask_bt, positions_bt = (
                self.to_sequence_order(a) for a in (input_ids_bt, attention_mask_bt, positions_bt)
            )
            if segment_ids_bt is not None:
                segment_ids_bt = self.to_sequence_order(segment_ids_bt)
        extra = {"sequence_parallel_rows": True} if parallel else {}
        out = self.module.apply(
            {"params": params},
            input_ids_bt,
            positions_bt,
            attention_mask_bt,
            output_router_logits=self.is_moe,
            return_logits=False,
            rngs={"dropout": rng} if rng is not None else None,
            segment_ids_bt=segment_ids_bt,
            **extra,
        )
        return out["final_hidden"], tuple(out.get("router_logits", ()))

    def to_sequence_order(self, x_bt):
        """[b, t, ...] in the order the trunk's outputs come in: zig-zag over the sequence axis (that
        axis's devices each hold two chunks of every row, balancing causal attention); unchanged without one."""
        if self.sequence_shards == 1:
            return x_bt
        axes = ("batch", "length") + (None,) * (x_bt.ndim - 2)
        return self.sharding.constrain(to_zigzag(x_bt, self.sequence_shards), axes)

    def from_sequence_order(self, x_bt):
        """The inverse of `to_sequence_order`: per-token outputs of the trunk back in row order."""
        if self.sequence_shards == 1:
            return x_bt
        return from_zigzag(x_bt, self.sequence_shards)

    def lm_head(self, params):
        """The output projection as stored: the embedding [vocab, d] when tied, else lm_head [d, vocab]."""
        return params["embed_tokens"] if self.config.tie_word_embeddings else params["lm_head"]

    def logits(self, hidden_btd, head):
        """float32 logits of final hidden states, by the model's own LM head."""
        logits_btv = vocab_logits(hidden_btd, head, self.config.tie_word_embeddings, self.dtype)
        return self.sharding.constrain(logits_btv, ("batch", "length", "act_vocab"))

    def constrain_hidden(self, x_btd):
        return self.sharding.constrain(x_btd, ("batch", "length", "act_embed"))

    # ---------------------------------------------------------------------------------- MoE terms
    def aux_loss(self, router_logits, attention_mask_bt):
        cfg = self.config
        return load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask_bt)

    def z_loss(self, router_logits, attention_mask_bt):
        return router_z_loss(router_logits, attention_mask_bt)


def flops_per_token(config: Qwen2Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x active matmul parameters, plus
    attention scores and values (12 x layers x heads x head_dim x seq_len / 2 for causal)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    h = config.head_size
    attn_proj = d * h * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    per_layer = 0
    for i in range(layers):
        if config.is_sparse_layer(i):
            mlp = 3 * d * config.moe_intermediate_size * config.num_experts_per_tok
            mlp += 3 * d * config.shared_expert_intermediate_size + d * config.num_experts
        else:
            mlp = 3 * d * config.intermediate_size
        per_layer += attn_proj + mlp
    head = d * config.vocab_size
    attention = 12 * layers * config.num_attention_heads * h * seq_len / 2
    return 6.0 * (per_layer + head) + attention


__all__ = [
    "params_handler",
    "params_save_args",
    "ModelSource",
    "ModelSetup",
    "resolve_model",
    "build_mesh",
    "batch_axes_size",
    "batch_sharding",
    "replicated",
    "flops_per_token",
    "ShardingError",
    "ConfigError",
]
