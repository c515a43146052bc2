"""Optimizers: MAE's AdamW recipe with the linear learning-rate scaling rule, for pretraining and
fine-tuning, and LARS for linear probing.

- ``lr = base_lr * global_batch / 256`` (Table 13: 1.5e-4 * 4096 / 256 = 2.4e-3; a recipe
  given per 512 images, SimMIM's, is halved into this rule),
- linear warmup, then cosine decay to ``min_lr`` or (``schedule='multistep'``) steps down,
- AdamW with ``beta2 = 0.95`` and weight decay 0.05, except on the parameters
  ``no_decay`` names: by default biases, norm scales, tokens and position tables; each
  framework's recipe sets its official rule (timm's ``add_weight_decay``, every
  one-dimensional parameter, for MAE's pretraining: ``ONE_DIMENSIONAL``),
- optional global-norm gradient clipping.

Classifiers (``build_classifier_optimizer``) add MAE's fine-tuning pieces:
layer-wise lr decay (block ``i`` of ``L`` scaled by ``decay^(L + 1 - (i + 1))``,
the embeddings by ``decay^(L + 1)``, the head by 1; a Swin numbers its blocks across
stages and counts each patch merging with its stage's last block, SimMIM's rule), LARS (MoCo v3's, as MAE's
linear probe uses: no weight decay or trust ratio for biases and norms), and
frozen parameters (partial fine-tuning) that no update or weight decay touches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from prmim_jax.models import classifier, layers

# The parameters weight decay leaves alone, by name (the last element of their path), unless a recipe says
# otherwise (``optimizer.no_decay``): biases, norm scales, tokens, position tables, and Swin's relative position
# tables (the official Swin's no_weight_decay_keywords). ``ONE_DIMENSIONAL`` stands for every parameter of at
# most one dimension (timm's ``add_weight_decay``, which MAE's, LocalMIM's and TEC's pretraining use).
NO_DECAY_NAMES = ("bias", "scale", "cls_token", "mask_token", "pos_embedding", "relative_position_bias_table")
ONE_DIMENSIONAL = "1d"
OPTIMIZERS = ("adamw", "lars")
SCHEDULES = ("cosine", "multistep")


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
            grad_clip_norm=config_dict.placeholder(float),  # None (or 0): no clipping
            no_decay=NO_DECAY_NAMES,  # parameter names (and ONE_DIMENSIONAL) weight decay leaves alone
            schedule="cosine",  # after the warmup: 'cosine' to min_lr, or 'multistep' (SimMIM's ViT pretraining)
            decay_steps=(),  # multistep: the steps after which the learning rate is multiplied by decay_factor
            decay_factor=0.1,
        )
    )
    config.update(overrides)
    return config


def peak_learning_rate(config: ml_collections.ConfigDict, global_batch: int) -> float:
    return config.base_lr * global_batch / 256


def learning_rate_schedule(config: ml_collections.ConfigDict, global_batch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` to the scaled peak, then cosine decay to ``min_lr`` at ``total_steps``
    (``schedule='cosine'``), or the peak multiplied by ``decay_factor`` after each of ``decay_steps``
    (``'multistep'``: SimMIM's ViT pretraining, x0.1 after epoch 700 of 800)."""
    peak = peak_learning_rate(config, global_batch)
    if not 0 <= config.warmup_steps <= total_steps:
        raise ValueError(
            f"optimizer.warmup_steps={config.warmup_steps} must lie in [0, total_steps={total_steps}]; "
            "lower --config.optimizer.warmup_steps or raise --config.total_steps."
        )
    if config.warmup_steps == total_steps:  # a smoke run that is all warmup: nothing left to decay over
        return optax.linear_schedule(0.0, peak, max(total_steps, 1))
    schedule = config.get("schedule", "cosine")  # configs saved before the key existed: cosine
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}; choose one of {SCHEDULES}.")
    if schedule == "multistep":
        steps = tuple(config.decay_steps)
        if list(steps) != sorted(set(steps)) or not all(config.warmup_steps < s <= total_steps for s in steps):
            raise ValueError(
                f"optimizer.decay_steps={steps} must be increasing steps after the warmup ({config.warmup_steps}) "
                f"and at most total_steps={total_steps}; set --config.optimizer.decay_steps."
            )
        warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
        steady = optax.piecewise_constant_schedule(peak, {s - config.warmup_steps: config.decay_factor for s in steps})
        return optax.join_schedules([warmup, steady], [config.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, 1),
        end_value=config.min_lr,
    )


def weight_decay_mask(params, no_decay=NO_DECAY_NAMES):
    """A pytree of bools matching ``params``: True where weight decay applies, i.e. every parameter except those
    whose name (the last element of their path) ``no_decay`` lists (``optimizer.no_decay``) and, with
    ``ONE_DIMENSIONAL`` listed, those of at most one dimension."""
    names, one_dimensional = set(no_decay), ONE_DIMENSIONAL in no_decay

    def decays(path, leaf):
        return layers.path_names(path)[-1] not in names and not (one_dimensional and jnp.ndim(leaf) <= 1)

    return jax.tree_util.tree_map_with_path(decays, params)


def decay_mask_of(config: ml_collections.ConfigDict):
    """``weight_decay_mask`` with ``config.no_decay`` (configs saved before the key existed: ``NO_DECAY_NAMES``)."""
    return functools.partial(weight_decay_mask, no_decay=tuple(config.get("no_decay", NO_DECAY_NAMES)))


def build_optimizer(
    config: ml_collections.ConfigDict, global_batch: int, total_steps: int
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, global_batch, total_steps)
    adamw = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask_of(config)
    )
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def classifier_optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """The optimizer section of a fine-tuning config: the paper's Table 14 (ViT-B) by default.

    ``name``: ``'adamw'`` (fine-tuning) or ``'lars'`` (linear probing,
    ``momentum``); ``layer_decay`` 1.0 turns layer-wise lr decay off.
    """
    config = optimizer_config(base_lr=5e-4, min_lr=1e-6, b2=0.999, weight_decay=0.05)
    config.update(dict(name="adamw", layer_decay=0.65, momentum=0.9))
    config.update(overrides)
    return config


def scale_by_layer(decay: float, depth: int, layer_ids=None) -> optax.GradientTransformation:
    """Multiplies each update by ``decay ** (depth + 1 - layer)``, layers from ``layer_ids(params)`` (default:
    a ViT classifier's, ``classifier.layer_ids``; ``classifier.lr_layers`` gives any classifier's).

    Applied after AdamW it scales the learning rate of the whole update, weight
    decay included: MAE's per-layer ``lr_scale``.
    """
    layer_ids = layer_ids or (lambda params: classifier.layer_ids(params, depth))

    def update(updates, state, params=None):
        del params
        layers = layer_ids(updates)
        return jax.tree.map(lambda u, layer: u * decay ** (depth + 1 - layer), updates, layers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_classifier_optimizer(
    config: ml_collections.ConfigDict,
    global_batch: int,
    total_steps: int,
    *,
    depth: int,
    trainable_blocks: int | None = None,
    layer_ids=None,
) -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay (``scale_by_layer``'s ``depth`` and ``layer_ids``), or LARS; parameters
    outside ``trainable_mask`` stay as loaded."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={config.name!r}; choose one of {OPTIMIZERS}.")
    schedule = learning_rate_schedule(config, global_batch, total_steps)
    if config.name == "lars":
        # MoCo v3's LARS: 1-d parameters (biases, norms) get neither weight decay nor the trust ratio.
        def matrices(params):
            return jax.tree.map(lambda p: p.ndim > 1, params)

        tx = optax.lars(
            schedule,
            weight_decay=config.weight_decay,
            weight_decay_mask=matrices,
            trust_ratio_mask=matrices,
            momentum=config.momentum,
        )
    else:
        tx = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask_of(config)
        )
        if config.layer_decay != 1.0:
            tx = optax.chain(tx, scale_by_layer(config.layer_decay, depth, layer_ids))
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if trainable_blocks is None:
        return tx

    def labels(params):
        mask = classifier.trainable_mask(params, depth, trainable_blocks)
        return jax.tree.map(lambda trains: "train" if trains else "frozen", mask)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
