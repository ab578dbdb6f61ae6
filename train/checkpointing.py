"""Training checkpoints: Orbax CheckpointManager (async saves, keep the last N, atomic step directories).

Layout under `<output_dir>/checkpoints/`:

    qwen2_jax_metadata.json, config.json   what makes the run loadable by `load_checkpoint`
    <step>/params/      the params tree, in the same layout as qwen2-convert writes (so
                        `load_checkpoint(<output_dir>/checkpoints)` and `qwen2-convert orbax-to-hf` read it)
    <step>/adapters/    instead of params/ in a LoRA run: the trained adapters (the frozen base is
                        not saved: it is the run's `model`; train/lora_setup.py)
    <step>/opt_state/   the optax state, sharded like the params
    <step>/meta/        JSON: step, the RNG key, the data iterator state, the run config

Each step directory is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoint as the latest; leftovers are removed at the next start.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.safetensors_io import CheckpointError
from train.model_setup import params_handler, params_save_args
from train.train_step import TrainState

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointStore:
    def __init__(self, output_dir: str, *, keep: int, async_saves: bool = True, trained_item: str = "params"):
        """trained_item: the item that holds TrainState.params ("params", or a LoRA run's "adapters")."""
        self.directory = os.path.abspath(os.path.join(output_dir, CHECKPOINT_SUBDIR))
        self.trained_item = trained_item
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_saves,
            save_interval_steps=1,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                trained_item: params_handler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_same_model(self, config: Qwen2Config) -> None:
        """Before resuming (and before this run rewrites config.json): the saved checkpoints must be of
        `config`'s architecture, else a CheckpointError names the fields that differ (restoring would
        otherwise fail deep inside Orbax on the first mismatched array)."""
        path = os.path.join(self.directory, "config.json")
        if self.latest_step() is None or not os.path.exists(path):
            return
        saved = Qwen2Config.from_hf(path)
        if saved == config:
            return
        differ = [
            f"{f.name} {getattr(saved, f.name)} there, {getattr(config, f.name)} now"
            for f in dataclasses.fields(config)
            if f.compare and getattr(saved, f.name) != getattr(config, f.name)
        ]
        raise CheckpointError(
            f"{self.directory} holds checkpoints of another model ({'; '.join(differ)}): "
            "resume with the model it was trained with, or give another output_dir"
        )

    def save(self, state: TrainState, meta: dict[str, Any], *, wait: bool = False) -> None:
        """Start saving the state (device-to-host copies happen before this returns; the writes go on
        in the background unless wait=True). `meta` must be JSON-serialisable."""
        step = int(jax.device_get(state.step))
        meta = dict(meta, step=step, rng=[int(x) for x in np.asarray(jax.device_get(state.rng))])
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{self.trained_item: ocp.args.PyTreeSave(state.params, save_args=params_save_args(state.params))},
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `step`, every array placed straight into its sharding, and its meta
        (TrainState.frozen is not saved: the caller puts it back)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), self.trained_item)):
            kind = "LoRA" if self.trained_item == "params" else "full"
            raise CheckpointError(
                f"{self.directory}/{step} has no {self.trained_item}/ (a {kind} fine-tuning run's checkpoint?): "
                "resume with that run's lora settings, or give another output_dir"
            )
        params_target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.params, shardings.params
        )
        params_args = jax.tree.map(
            lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype), abstract.params, shardings.params
        )
        opt_target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.opt_state, shardings.opt_state
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{self.trained_item: ocp.args.PyTreeRestore(item=params_target, restore_args=params_args)},
                opt_state=ocp.args.StandardRestore(opt_target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = dict(restored["meta"])
        if int(meta["step"]) != step:
            raise ValueError(f"{self.directory}/{step}: meta says step {meta['step']}")
        state = TrainState(
            step=jax.device_put(np.asarray(step, np.int32), shardings.step),
            params=restored[self.trained_item],
            opt_state=restored["opt_state"],
            rng=jax.device_put(np.asarray(meta["rng"], np.uint32), shardings.rng),
        )
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        # Orbax starts removing a killed run's temporary step directories in a background thread when the
        # manager is built, and its close() does not wait for that thread: a run that ends early (a user
        # error before the first save) would exit with it still running, and interpreter shutdown makes it
        # fail with a traceback on stderr. Wait for it first (save() does the same before writing).
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()
