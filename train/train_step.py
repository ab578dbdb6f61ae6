"""The training state and the jitted train / eval steps (explicit in/out shardings, state donated)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from train.objective import Objective
from train.optimizer import opt_state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # what the optimizer trains: the model's params, or a LoRA run's adapters
    opt_state: Any
    rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s)
    frozen: Any = None  # params the step reads and never updates (a LoRA run's base); None: none


def trained_params(params, frozen, rng):
    """The model params of a full fine-tuning step: the trained params themselves. A LoRA run's
    `model_params` (train/lora_setup.py) puts its adapters on the frozen base instead."""
    return params


def abstract_state(setup, tx) -> TrainState:
    params = setup.abstract_params()
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )


def state_shardings(setup, tx, replicated) -> TrainState:
    params = setup.param_shardings()
    return TrainState(
        step=replicated,
        params=params,
        opt_state=opt_state_shardings(tx, setup.abstract_params(), params, replicated),
        rng=replicated,
    )


def new_state(params, tx, seed: int, shardings: TrainState) -> TrainState:
    """A step-0 state around (sharded) params: the optimizer state is created by a jitted init whose
    out_shardings put each moment beside its parameter."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params, opt_state=opt_state, rng=rng
    )


def make_train_step(
    objective: Objective, tx: optax.GradientTransformation, schedule, grad_accum_steps: int, model_params=None
):
    """step(state, batch, reference=None) -> (state, metrics). batch: {"input_ids": [B, T], ...} for the
    whole optimizer step; with grad_accum_steps = k it is split into k micro-batches of B/k, whose
    gradients are summed (a lax.scan: one compiled micro-step). model_params(state.params, state.frozen,
    rng): the params the objective runs (default `trained_params`); gradients are taken w.r.t.
    state.params only. reference: a DPO reference model's params, read and never trained; without one
    the objective's reference is state.frozen (a LoRA run's base: the policy with its adapters off)."""
    k = grad_accum_steps
    setup = objective.setup
    model_params = model_params or trained_params

    def step(state: TrainState, batch, reference=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        total_tokens = objective.normalizer(batch)
        reference = state.frozen if reference is None else reference

        def micro_objective(params, micro_batch, micro_rng):
            terms = objective.terms(model_params(params, state.frozen, micro_rng), micro_batch, micro_rng, reference)
            return objective.combine(terms, total_tokens, k), terms

        grad_fn = jax.value_and_grad(micro_objective, has_aux=True)
        if k == 1:
            (value, terms), grads = grad_fn(state.params, batch, rng)
        else:
            micro_batches = jax.tree.map(lambda x: _split_micro(x, k, setup), batch)

            def accumulate(carry, xs):
                grads_acc, value_acc, terms_acc = carry
                micro_batch, i = xs
                (value, terms), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                terms_acc = jax.tree.map(jnp.add, terms_acc, terms)
                return (grads_acc, value_acc + value, terms_acc), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            terms0 = jax.tree.map(
                lambda x: jnp.zeros(x.shape, x.dtype),
                jax.eval_shape(
                    lambda: objective.terms(
                        model_params(state.params, state.frozen, None),
                        jax.tree.map(lambda x: x[0], micro_batches),
                        None,
                        reference,
                    )
                ),
            )
            (grads, value, terms), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), terms0), (micro_batches, jnp.arange(k))
            )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": value,
            **objective.metrics(terms, total_tokens, k),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": jnp.isfinite(value) & jnp.isfinite(grad_norm),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def _split_micro(x, k: int, setup):
    """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block
    of rows splits evenly over the micro-batches, so no row moves between devices."""
    b = x.shape[0] // k
    x = jnp.moveaxis(x.reshape((b, k) + x.shape[1:]), 1, 0)
    return setup.sharding.constrain(x, (None, "batch", "length") + (None,) * (x.ndim - 3))


def make_eval_step(objective: Objective, model_params=None):
    """eval(params, batch, frozen, reference=None) -> (sum of losses, what they are a sum over: tokens, or
    DPO's pairs): a mean over many batches (params, frozen: a TrainState's; reference: as the step's)."""
    model_params = model_params or trained_params

    def evaluate(params, batch, frozen=None, reference=None):
        reference = frozen if reference is None else reference
        terms = objective.terms(model_params(params, frozen, None), batch, None, reference)
        return terms["loss_sum"], objective.normalizer(batch)

    return evaluate


def jit_train_step(step_fn, shardings: TrainState, batch_shardings, replicated, reference_shardings=None):
    """reference_shardings: those of step_fn's third argument (a DPO reference's params), when it takes one."""
    reference = () if reference_shardings is None else (reference_shardings,)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings, *reference),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(
    eval_fn, param_shardings, batch_shardings, replicated, frozen_shardings=None, reference_shardings=None
):
    reference = () if reference_shardings is None else (reference_shardings,)
    return jax.jit(
        eval_fn, in_shardings=(param_shardings, batch_shardings, frozen_shardings, *reference), out_shardings=replicated
    )
