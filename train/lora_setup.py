"""LoRA fine-tuning in qwen2-train (the `lora:` config section, rank > 0).

What the step trains is the adapter tree of `qwen2_jax.lora` (float32, B = 0 at the start, so step 0's
loss is the base model's), sharded like the base kernels it adapts. The base model is frozen: it rides
in `TrainState.frozen`, in `lora.base_dtype` (a float dtype, or int8 kernels QLoRA-style; embeddings,
norms and the LM head stay float), is never differentiated and never saved (a resumed run loads it
again from `model`). The optimizer sees the adapters only, so its state is adapter-sized.

The forward pass is the model's own with `lora.apply`: `model_params(adapters, base, rng)` is the
policy (adapters on, dropout on their inputs when a key is given) and `reference_params(adapters,
base)` the same base with the adapters off, no second copy of the weights: what a DPO objective's
reference model needs in a LoRA run.

Checkpoints hold the adapters (`<step>/adapters/`) and their optimizer state, and at every save a
PEFT adapter directory `<output_dir>/checkpoints/adapter/` (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained`, `qwen2-generate --adapter`,
`qwen2-serve --adapter` and `qwen2-convert merge-lora` take with the base model.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from qwen2_jax import lora
from qwen2_jax.config import ConfigError
from qwen2_jax.params import abstract_params, param_shardings
from qwen2_jax.peft_adapter import save_peft_adapter
from qwen2_jax.quantize import quantize_params
from qwen2_jax.safetensors_io import CheckpointError
from train.config import LoraSection, TrainConfig
from train.model_setup import ModelSetup, ModelSource
from train.optimizer import opt_state_shardings
from train.train_step import TrainState, new_state

ADAPTERS_ITEM = "adapters"  # the checkpoint item of the trained adapters (a full run's is "params")
ADAPTER_DIR = "adapter"  # the PEFT directory beside the step directories
_DROPOUT_STREAM = 0x10A  # folded into the step's key for the adapters' dropout masks
_INIT_STREAM = 1  # folded into the seed's key for the adapters' init (the base's fresh init uses the seed itself)


def enabled(config: TrainConfig) -> bool:
    return config.lora.rank > 0


def lora_config_of(section: LoraSection) -> lora.LoraConfig:
    return lora.LoraConfig(
        rank=section.rank,
        alpha=section.alpha,
        dropout=section.dropout,
        target_modules=section.target_modules,
        use_rslora=section.use_rslora,
    )


def base_options(config: TrainConfig) -> dict:
    """ModelSetup's param_dtype and quantize: a LoRA run's frozen base is stored in lora.base_dtype
    (null: param_dtype; int8: int8 kernels, the rest in param_dtype); a full run's params in param_dtype."""
    base = config.lora.base_dtype if enabled(config) else None
    if base == "int8":
        return {"param_dtype": config.param_dtype, "quantize": "int8"}
    return {"param_dtype": base or config.param_dtype, "quantize": None}


class LoraTraining:
    """The adapters (trained) and the base (frozen) of a LoRA run on `setup`'s model and mesh."""

    def __init__(self, setup: ModelSetup, lora_config: lora.LoraConfig):
        try:
            lora.check_supported(setup.config)
        except ValueError as e:
            raise ConfigError(f"lora: {e}") from None
        self.setup = setup
        self.lora_config = lora_config
        self.quantize = setup.options.quantize

    @classmethod
    def from_config(cls, config: TrainConfig, setup: ModelSetup) -> LoraTraining | None:
        return cls(setup, lora_config_of(config.lora)) if enabled(config) else None

    # ---------------------------------------------------------------------------- the adapters
    def abstract_adapters(self):
        return lora.abstract_adapters(self.setup.config, self.lora_config)

    def adapter_shardings(self):
        return lora.adapter_shardings(self.setup.config, self.lora_config, self.setup.mesh)

    def init_adapters(self, seed: int):
        """Fresh adapters as peft initialises them (B = 0), each created on its devices."""
        key = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
        init = jax.jit(
            lambda k: lora.init_adapters(self.setup.config, self.lora_config, k), out_shardings=self.adapter_shardings()
        )
        return init(key)

    # -------------------------------------------------------------------------------- the base
    def abstract_base(self):
        return self._base_tree(lambda options: abstract_params(self.setup.config, self.setup.param_dtype, options))

    def base_shardings(self):
        cfg, mesh, dtype = self.setup.config, self.setup.mesh, self.setup.param_dtype
        return self._base_tree(lambda options: param_shardings(cfg, mesh, dtype, options))

    def _base_tree(self, of_layout):
        """A tree over the base's leaves: the model's in its layout, except that an int8 base keeps
        its float LM head (`quantize_params(head=False)`)."""
        options = self.setup.options
        tree = dict(of_layout(options))
        if self.quantize is not None:
            for name in ("lm_head_int8", "lm_head_int8_scale"):
                tree.pop(name)
            if not self.setup.config.tie_word_embeddings:
                tree["lm_head"] = of_layout(options.replace(quantize=None))["lm_head"]
        return tree

    def load_base(self, source: ModelSource, seed: int):
        """The frozen base, sharded: the `model` checkpoint (cast to the base dtype), or a fresh init
        from the seed as a full run makes it; int8 kernels quantized from it on the devices."""
        setup = self.setup
        if self.quantize is None:
            return setup.load_params(source.checkpoint) if source.checkpoint else setup.init_params(seed)
        float_setup = ModelSetup(setup.config, setup.mesh, param_dtype=setup.param_dtype.name)
        params = float_setup.load_params(source.checkpoint) if source.checkpoint else float_setup.init_params(seed)
        return quantize_params(setup.config, params, quantize=self.quantize, consume=True, head=False)

    # ------------------------------------------------------------------------------- the state
    def abstract_state(self, tx) -> TrainState:
        adapters = self.abstract_adapters()
        return TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=adapters,
            opt_state=jax.eval_shape(tx.init, adapters),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
            frozen=self.abstract_base(),
        )

    def state_shardings(self, tx, replicated) -> TrainState:
        adapters = self.adapter_shardings()
        return TrainState(
            step=replicated,
            params=adapters,
            opt_state=opt_state_shardings(tx, self.abstract_adapters(), adapters, replicated),
            rng=replicated,
            frozen=self.base_shardings(),
        )

    def new_state(self, source: ModelSource, tx, seed: int, shardings: TrainState) -> TrainState:
        state = new_state(self.init_adapters(seed), tx, seed, shardings)
        return state.replace(frozen=self.load_base(source, seed))

    def check_resumable(self, checkpoint_dir: str, step: int | None) -> None:
        """Before resuming: the saved adapters must have this run's shapes (rank and target modules),
        else one CheckpointError line (restoring would fail deep inside Orbax)."""
        if step is None:
            return
        try:
            with open(os.path.join(checkpoint_dir, str(step), "meta", "metadata"), encoding="utf-8") as f:
                saved = json.load(f)["config"]["lora"]
            saved_shape = (saved["rank"], tuple(m for m in lora.TARGET_MODULES if m in saved["target_modules"]))
        except (OSError, ValueError, KeyError, TypeError):
            return  # not ours to judge: the restore reports what is wrong
        cfg = self.lora_config
        if saved_shape != (cfg.rank, cfg.target_modules):
            raise CheckpointError(
                f"{checkpoint_dir} holds LoRA adapters of rank {saved_shape[0]} on {', '.join(saved_shape[1])}, "
                f"this run asks for rank {cfg.rank} on {', '.join(cfg.target_modules)}: resume with the saved "
                "lora settings, or give another output_dir"
            )

    # ----------------------------------------------------------------------------- the forward
    def model_params(self, adapters, base, rng):
        """The policy: the base with the adapters on (dropout on their inputs when rng is a key)."""
        dropout_rng = None
        if rng is not None and self.lora_config.dropout > 0:
            dropout_rng = jax.random.fold_in(rng, _DROPOUT_STREAM)
        return lora.apply(base, adapters, self.lora_config, dropout_rng=dropout_rng)

    def reference_params(self, adapters, base):
        """The model before fine-tuning: the same base, adapters off (a DPO reference, no copy)."""
        del adapters
        return base

    # ------------------------------------------------------------------------------- the export
    def save_adapter(self, checkpoint_dir: str, adapters, base_model: str | None) -> str:
        """Write the PEFT adapter directory `<checkpoint_dir>/adapter` (atomically; from process 0,
        every process taking part in gathering the adapters). Returns its path."""
        gathered = multihost_utils.process_allgather(adapters, tiled=True)
        path = os.path.join(checkpoint_dir, ADAPTER_DIR)
        if jax.process_index() == 0:
            save_peft_adapter(path, self.setup.config, self.lora_config, gathered, base_model_name_or_path=base_model)
        return path

    def count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_adapters()))


def base_model_name(config: TrainConfig, source: ModelSource) -> str:
    """adapter_config.json's base_model_name_or_path: the checkpoint the run started from, else the
    model key (a preset name)."""
    return os.path.abspath(source.checkpoint) if source.checkpoint else config.model
