"""Optimizers: MAE's AdamW recipe with the linear learning-rate scaling rule.

- ``lr = base_lr * global_batch / 256`` (Table 13: 1.5e-4 * 4096 / 256 = 2.4e-3),
- linear warmup then cosine decay to ``min_lr``,
- AdamW with ``beta2 = 0.95`` and weight decay 0.05 on weight matrices only:
  biases, norm scales, cls and mask tokens are not decayed (MAE's
  ``param_groups_weight_decay``; position tables are constants here),
- optional global-norm gradient clipping.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

NO_DECAY_NAMES = ("bias", "scale", "cls_token", "mask_token")


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """The optimizer section of a pretraining config, the paper's Table 13."""
    config = ml_collections.ConfigDict(
        dict(
            base_lr=1.5e-4,
            min_lr=0.0,
            warmup_steps=0,  # experiment configs set these from their epochs
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            grad_clip_norm=None,
        )
    )
    config.update(overrides)
    return config


def peak_learning_rate(config: ml_collections.ConfigDict, global_batch: int) -> float:
    return config.base_lr * global_batch / 256


def learning_rate_schedule(config: ml_collections.ConfigDict, global_batch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` to the scaled peak, then cosine decay to ``min_lr`` at ``total_steps``."""
    peak = peak_learning_rate(config, global_batch)
    if not 0 <= config.warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps} must lie in [0, total_steps={total_steps}].")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, 1),
        end_value=config.min_lr,
    )


def weight_decay_mask(params) -> object:
    """A pytree of bools matching ``params``: True where weight decay applies."""

    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(
    config: ml_collections.ConfigDict, global_batch: int, total_steps: int
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, global_batch, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw
