"""AdamW with a warmup-then-decay schedule and global-norm clipping (optax), and its state's shardings."""

from __future__ import annotations

import jax
import optax

from train.config import OptimizerConfig

# Parameter leaf names that are not matrices of a linear map: no weight decay unless asked.
NO_DECAY_LEAVES = ("scale", "bias", "embed_tokens")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak over warmup_steps, then cosine / linear decay to
    peak * final_learning_rate_ratio at total_steps (or constant)."""
    peak = cfg.learning_rate
    final = peak * cfg.final_learning_rate_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_learning_rate_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, final, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """True for leaves that get weight decay: matrices, not norm scales, biases or embeddings."""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return not any(n in NO_DECAY_LEAVES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_biases_embeddings else decay_mask
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts), schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, replicated):
    """Shardings of the optimizer state: every param-shaped leaf (Adam moments) like its parameter,
    everything else (step counts) replicated. Leaves are matched by their dict-key path, which optax
    state trees share with the params tree (masked-out leaves have no entry at all)."""
    by_path = {
        _dict_path(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings)
        )
    }

    def pick(path, leaf):
        match = by_path.get(_dict_path(path))
        return match[1] if match is not None and match[0] == leaf.shape else replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, abstract_params))


def _dict_path(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
