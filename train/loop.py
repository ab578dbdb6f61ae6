"""The training run: set up (or resume) the state, then step, log, evaluate and checkpoint until done.

Rerunning the same command on the same output_dir continues from the latest checkpoint, with the data
iterator where it was, so the resumed run logs the same losses as an unbroken one. SIGTERM lets the
current step finish, saves, and returns normally. A non-finite loss or gradient stops the run before
anything is saved, so the last checkpoint on disk is the last good state.

Several processes (train/distributed.py) run this same loop in lockstep: each feeds its block of the
global batch; SIGTERM on any one of them stops all at the same step (the processes agree on the flag
after every step), all save that step together and return. Logs, metrics and TensorBoard come from
process 0. The checkpoint may come from another mesh, device count or process count: Orbax reshards
the params and optimizer state into this run's shardings, and the data continues at the saved global
sample (the iterator state is a position in the global stream, not a per-process state).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.cli_support import UsageError
from train import distributed, lora_setup, upcycle
from train import model_setup as ms
from train.batches import Corpus, DataProvider, global_batch, process_share
from train.checkpointing import CheckpointStore
from train.config import TrainConfig
from train.dpo_data import PreferenceCorpus
from train.dpo_loss import METRIC_NAMES as DPO_METRICS
from train.dpo_run import dpo_batch_fields, dpo_objective, start_reference
from train.metrics import MetricsLogger, peak_flops_per_device, perplexity
from train.objective import Objective
from train.optimizer import make_optimizer
from train.sft_data import BATCH_FIELDS as SFT_BATCH_FIELDS
from train.sft_data import ChatCorpus
from train.train_step import (
    TrainState,
    abstract_state,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
    new_state,
    state_shardings,
)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm."""


@dataclasses.dataclass
class Run:
    """Everything built from the config before the first step."""

    config: TrainConfig
    setup: ms.ModelSetup
    tx: Any
    schedule: Any
    shardings: TrainState
    batch_sharding: Any
    replicated: Any
    train_step: Any
    eval_step: Any
    source: ms.ModelSource
    lora: lora_setup.LoraTraining | None = None  # a LoRA run: adapters trained, the base frozen
    # those of the step's third argument (a DPO reference's own params), when it takes one
    reference_shardings: Any = None

    @property
    def takes_reference(self) -> bool:
        return self.reference_shardings is not None

    @property
    def mesh(self):
        return self.setup.mesh

    @property
    def batch_fields(self) -> dict[str, Any]:
        """The [batch, seq_len] arrays of a training batch and their dtypes: SFT and DPO rows carry their
        loss labels and the segment ids of their packed sequences; DPO rows with a precomputed reference
        its per-token log-probabilities."""
        if self.config.task == "dpo":
            return dpo_batch_fields(self.config.dpo)
        return dict.fromkeys(SFT_BATCH_FIELDS if self.config.task == "sft" else ("input_ids",), jnp.int32)

    def abstract_batch(self, rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        rows = self.config.batch_size if rows is None else rows
        shape = (rows, self.config.seq_len)
        fields = self.batch_fields.items()
        return {f: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding) for f, dtype in fields}

    def abstract_state(self) -> TrainState:
        abstract = self.lora.abstract_state(self.tx) if self.lora else abstract_state(self.setup, self.tx)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings)

    @property
    def checkpoint_item(self) -> str:
        return lora_setup.ADAPTERS_ITEM if self.lora else "params"

    def abstract_reference(self) -> tuple:
        """The step's third argument as shapes (a DPO reference's own params), or nothing."""
        if not self.takes_reference:
            return ()
        params = self.setup.abstract_params()
        return (
            jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, self.reference_shardings
            ),
        )

    def compile_train_step(self):
        return self.train_step.lower(self.abstract_state(), self.abstract_batch(), *self.abstract_reference()).compile()


def build_run(config: TrainConfig, devices=None) -> Run:
    """Mesh, model, optimizer and the jitted steps; raises UsageError for a mesh or batch that does not fit.
    devices: the mesh's devices when not this job's (the compile-only devices of `--dry-run --topology`)."""
    source = ms.resolve_model(config.model, config.model_overrides)
    upcycle.check_run(config, source.checkpoint, source.config)
    try:
        mesh = ms.build_mesh(dataclasses.asdict(config.mesh), devices)
    except ms.ShardingError as e:
        raise UsageError(f"mesh: {e}") from None
    ways = ms.batch_axes_size(mesh)
    if config.micro_batch_size % ways:
        micro = (
            f" (micro-batch {config.micro_batch_size} of grad_accum_steps {config.grad_accum_steps})"
            if config.grad_accum_steps > 1
            else ""
        )
        raise UsageError(
            f"batch_size {config.batch_size}{micro} is not divisible by the data-parallel mesh axes "
            f"(data x fsdp x expert = {ways})"
        )
    _check_sequence_axis(config, source.config, mesh.shape.get("sequence", 1))
    processes = jax.process_count() if devices is None else len({d.process_index for d in devices})
    if config.batch_size % processes:
        raise UsageError(f"batch_size {config.batch_size} is not divisible by the {processes} processes")
    setup = ms.ModelSetup(
        source.config,
        mesh,
        dtype=config.dtype,
        remat=config.remat,
        scan_unroll=config.scan_unroll,
        moe_impl=config.moe_impl,
        moe_exchange=config.moe_exchange,
        **lora_setup.base_options(config),
    )
    lora = lora_setup.LoraTraining.from_config(config, setup)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)  # over the adapters only in a LoRA run
    replicated = ms.replicated(mesh)
    shardings = lora.state_shardings(tx, replicated) if lora else state_shardings(setup, tx, replicated)
    batch_sharding = ms.batch_sharding(mesh)
    objective, reference_shardings = Objective(setup, config.loss), None
    if config.task == "dpo":
        objective, reference_shardings = dpo_objective(setup, config, lora)
    model_params = lora.model_params if lora else None
    # one sharding for every field of a batch (input_ids, and attention_mask in held-out batches)
    train_step = jit_train_step(
        make_train_step(objective, tx, schedule, config.grad_accum_steps, model_params),
        shardings,
        batch_sharding,
        replicated,
        reference_shardings,
    )
    eval_step = jit_eval_step(
        make_eval_step(objective, model_params),
        shardings.params,
        batch_sharding,
        replicated,
        shardings.frozen,
        reference_shardings,
    )
    return Run(
        config,
        setup,
        tx,
        schedule,
        shardings,
        batch_sharding,
        replicated,
        train_step,
        eval_step,
        source,
        lora,
        reference_shardings,
    )


def _check_sequence_axis(config: TrainConfig, model, shards: int) -> None:
    """What context parallelism (mesh.sequence > 1, qwen2_jax/sequence_parallel.py) cannot run."""
    if shards == 1:
        return
    if config.seq_len % (2 * shards):
        raise UsageError(
            f"seq_len {config.seq_len} is not divisible by 2 x mesh.sequence ({2 * shards}): each of the "
            f"{shards} devices holds two equal chunks of every sequence"
        )
    chunk = config.loss.chunk_length if 0 < config.loss.chunk_length < config.seq_len else config.seq_len
    if chunk % shards:
        raise UsageError(f"loss.chunk_length {chunk} is not divisible by mesh.sequence ({shards})")
    if model.num_experts > 0 and any(model.is_sparse_layer(i) for i in range(model.num_hidden_layers)):
        raise UsageError("mesh.sequence > 1 runs dense models only (this one has MoE layers)")
    if any(model.layer_is_sliding) or model.dual_chunk_attention is not None:
        raise UsageError("mesh.sequence > 1 runs full causal attention only (no sliding window, no dual chunk)")


class _StopFlag:
    """Set by SIGTERM: the loop finishes the current step, saves and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def train(config: TrainConfig, data: DataProvider | None = None, log=print) -> dict[str, Any]:
    """Run (or continue) training to config.total_steps. Returns a summary: final step, last metrics,
    whether it stopped early on SIGTERM."""
    start_time = time.perf_counter()
    if "://" in config.output_dir:
        raise UsageError(
            f"output_dir {config.output_dir}: a URL; give a path (for a bucket: its Cloud Storage FUSE "
            "mount, the same on every host)"
        )
    run = build_run(config)
    if data is None:
        # process 0 prepares the corpus first; the others then find it (shared filesystem) or make the same
        progress = config.progress and jax.process_index() == 0
        vocab_size = run.setup.config.vocab_size
        if config.task == "sft":
            data = distributed.process_0_first("corpus", lambda: ChatCorpus(config, run.source.checkpoint, vocab_size))
        elif config.task == "dpo":
            data = distributed.process_0_first(
                "corpus", lambda: PreferenceCorpus(config, run.source.checkpoint, vocab_size)
            )
        else:
            data = distributed.process_0_first("corpus", lambda: Corpus(config.data, config.seq_len, progress=progress))
    distributed.check_shared_directory(config.output_dir)
    store = CheckpointStore(
        config.output_dir,
        keep=config.keep_checkpoints,
        async_saves=config.async_checkpoints,
        trained_item=run.checkpoint_item,
    )
    try:
        return _train(run, data, store, start_time, log)
    finally:
        store.close()


def _train(run: Run, data: DataProvider, store: CheckpointStore, start_time: float, log) -> dict[str, Any]:
    config, setup = run.config, run.setup
    process_index = jax.process_index()
    if process_index != 0:
        log = _quiet
    share_index, share_count = process_share(run.batch_sharding, config.batch_size, config.seq_len)
    local_rows = config.batch_size // share_count
    # the step's third argument: a DPO reference's params (precomputed: attached to the rows instead)
    reference = start_reference(run, data, log) if config.task == "dpo" else ()
    train_iter = data.train_iterator(
        global_batch_size=config.batch_size, seed=config.seed, process_index=share_index, process_count=share_count
    )
    store.check_same_model(setup.config)
    if run.lora:
        run.lora.check_resumable(store.directory, store.latest_step())
    chat_data = isinstance(data, (ChatCorpus, PreferenceCorpus))
    if process_index == 0:
        # the starting checkpoint's tokenizer and generation assets go along (SFT, DPO: their chat data's)
        assets_from = (run.source.checkpoint or config.init.upcycle_from) if not chat_data else None
        setup.write_checkpoint_files(store.directory, source=f"qwen2-train {config.model}", assets_from=assets_from)
        if chat_data:
            data.write_assets(store.directory)
            log(data.summary(config.seq_len, config.data.packing, config.data.truncation))

    resume_step = store.latest_step()
    latest = distributed.agree("latest-checkpoint", str(resume_step))
    if latest != str(resume_step):
        raise UsageError(
            f"process {process_index} finds the latest checkpoint of {store.directory} at {resume_step}, "
            f"process 0 at {latest}: the processes must share one output_dir"
        )
    elapsed_before = 0.0
    if resume_step is not None:
        state, meta = store.restore(resume_step, run.abstract_state(), run.shardings)
        if run.lora:
            state = state.replace(frozen=run.lora.load_base(run.source, config.seed))
        train_iter.set_state(meta["data"])
        elapsed_before = float(meta.get("elapsed", 0.0))
        log(f"qwen2-train: resuming {config.output_dir} from step {resume_step}")
    elif run.lora:
        state = run.lora.new_state(run.source, run.tx, config.seed, run.shardings)
    else:
        source = run.source
        if source.checkpoint:
            params = setup.load_params(source.checkpoint)
        elif config.init.upcycle_from:
            params = upcycle.upcycled_params(setup, config.init, config.seed)
        else:
            params = setup.init_params(config.seed)
        state = new_state(params, run.tx, config.seed, run.shardings)
    step = int(jax.device_get(state.step))

    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(setup.abstract_params()))
    log(
        f"qwen2-train: {config.model} ({_count(n_params)} params) on mesh "
        f"{' x '.join(f'{k}={v}' for k, v in run.mesh.shape.items())}, {config.batch_size} x {config.seq_len} "
        f"tokens per step, steps {step}..{config.total_steps}"
        + (f"; LoRA rank {run.lora.lora_config.rank}: {_count(run.lora.count())} trained" if run.lora else "")
    )
    compiled_step = run.compile_train_step()
    logger = MetricsLogger(
        config.output_dir,
        total_steps=config.total_steps,
        resume_step=resume_step,
        enabled=process_index == 0,
        progress=config.progress,
    )
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = ms.flops_per_token(setup.config, config.seq_len)
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    last_metrics: dict[str, Any] = {}
    stopped_early = False

    def checkpoint(wait=False):
        meta = {
            "data": train_iter.get_state(),
            "elapsed": elapsed_before + time.perf_counter() - start_time,
            "config": config.to_dict(),
        }
        store.save(state, meta, wait=wait)
        if run.lora:
            run.lora.save_adapter(store.directory, state.params, lora_setup.base_model_name(config, run.source))

    try:
        with _StopFlag() as stop:
            interval_start, interval_steps = time.perf_counter(), 0
            while step < config.total_steps:
                local = next(train_iter)
                if local["input_ids"].shape != (local_rows, config.seq_len):
                    raise ValueError(
                        f"data pipeline gave a batch of shape {local['input_ids'].shape}, "
                        f"expected {(local_rows, config.seq_len)}"
                    )
                batch = global_batch(local, run.batch_sharding, config.batch_size)
                state, metrics = compiled_step(state, batch, *reference)
                step += 1
                interval_steps += 1
                if not bool(metrics["finite"]):
                    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                    raise NonFiniteError(
                        f"non-finite {'loss' if not np.isfinite(loss) else 'gradient'} at step "
                        f"{step} (loss {loss}, grad_norm {grad_norm}); last good checkpoint: "
                        f"{_describe(store.latest_step())}"
                    )
                do_eval = config.eval_every and step % config.eval_every == 0
                if step % config.log_every == 0 or do_eval or step == config.total_steps:
                    now = time.perf_counter()
                    record = _train_record(metrics, tokens_per_step * interval_steps / (now - interval_start))
                    record["elapsed"] = elapsed_before + now - start_time
                    if peak is not None:
                        record["mfu"] = record["tokens_per_second"] * flops_per_token / (peak * jax.device_count())
                    if do_eval:
                        record.update(evaluate(run, data, state.params, state.frozen, reference))
                    logger.log(step, record)
                    last_metrics = record
                    interval_start, interval_steps = time.perf_counter(), 0
                stopping = distributed.any_process(stop.requested)  # every process stops at the same step
                if stopping:
                    checkpoint(wait=True)
                    stopped_early = step < config.total_steps
                    where = f" on process {', '.join(map(str, stopping))}" if jax.process_count() > 1 else ""
                    log(f"qwen2-train: SIGTERM{where}: saved step {step}, stopping")
                    break
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    save_start = time.perf_counter()
                    checkpoint()
                    interval_start += time.perf_counter() - save_start  # throughput counts training only
            store.wait()
    finally:
        logger.close()
        if hasattr(train_iter, "close"):
            train_iter.close()  # the pipeline's prefetch threads
    return {"step": step, "metrics": last_metrics, "stopped_early": stopped_early}


def _train_record(metrics, tokens_per_second: float) -> dict[str, Any]:
    host = jax.device_get(metrics)
    record = {
        "loss": float(host["loss"]),
        "learning_rate": float(host["learning_rate"]),
        "grad_norm": float(host["grad_norm"]),
        "tokens_per_second": tokens_per_second,
    }
    for key in ("aux_loss", "z_loss", *DPO_METRICS):
        if key in host:
            record[key] = float(host[key])
    return record


def evaluate(run: Run, data: DataProvider, params, frozen=None, reference=()) -> dict[str, float]:
    """Mean token loss and perplexity over eval_batches batches of the held-out split (from its start);
    for DPO the mean pair loss (its "perplexity" is exp of that, and "tokens" counts pairs)."""
    config = run.config
    share_index, share_count = process_share(run.batch_sharding, config.batch_size, config.seq_len)
    it = data.eval_iterator(global_batch_size=config.batch_size, process_index=share_index, process_count=share_count)
    loss_sum, tokens = 0.0, 0.0
    for i, local in enumerate(it):
        if config.eval_batches and i >= config.eval_batches:
            break
        s, n = run.eval_step(params, global_batch(local, run.batch_sharding, config.batch_size), frozen, *reference)
        loss_sum += float(s)
        tokens += float(n)
    mean = loss_sum / max(tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": perplexity(mean), "eval_tokens": tokens}


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0."""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _describe(step):
    return "none" if step is None else f"step {step}"
