"""The pure classifier steps: ``train_step(state, batch, rng) -> (state, metrics)`` and ``eval_step``.

A batch is ``images [B, H, W, C] float32`` (normalised) and ``labels [B]
int32``; evaluation batches add ``mask [B] bool`` (False on padding rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from prmim_jax.data import augment
from prmim_jax.models.classifier import Classifier


class ClassifierState(train_state.TrainState):
    """A train state with the BatchNorm head's running statistics (``{}`` without one)."""

    batch_stats: Any = flax.struct.field(default_factory=dict)


def mixing_config(**overrides) -> ml_collections.ConfigDict:
    """Mixup / CutMix and label smoothing: the paper's Table 14 (timm's ``Mixup``, batch mode)."""
    config = ml_collections.ConfigDict(
        dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
    )
    config.update(overrides)
    return config


@dataclasses.dataclass(frozen=True)
class Mixing:
    """``mixing_config`` values plus the number of classes, hashable for ``jax.jit``."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    prob: float = 1.0
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> Mixing:
        return cls(num_classes, **config.to_dict())

    def targets(self, rng: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(images, targets [B, num_classes] float32)``: mixed when an alpha is set, else smoothed one-hot."""
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            return augment.mix_batch(
                rng,
                images,
                labels,
                self.num_classes,
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                switch_prob=self.switch_prob,
                prob=self.prob,
                label_smoothing=self.label_smoothing,
            )
        return images, augment.smooth_targets(labels, self.num_classes, self.label_smoothing)


def _variables(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(state: ClassifierState, batch: dict, rng: jax.Array, *, model: Classifier, mixing: Mixing):
    """One optimizer step on the soft-target cross-entropy of mixed batches.

    ``rng`` (the caller folds in the step) draws the mixing and drop path.
    Returns float32 scalar metrics ``loss`` and ``grad_norm``.
    """
    mix_rng, dropout_rng = jax.random.split(rng)
    images, targets = mixing.targets(mix_rng, batch["images"], batch["labels"])

    def loss_fn(params):
        logits, updates = model.apply(
            _variables(params, state.batch_stats),
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy(logits, targets).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def logits(params, batch_stats, images: jax.Array, *, model: Classifier) -> jax.Array:
    """``images [B, H, W, C] -> [B, num_classes] float32``, inference mode."""
    return model.apply(_variables(params, batch_stats), images, train=False)


def eval_step(params, batch_stats, batch: dict, *, model: Classifier) -> dict:
    """Sums over the batch's real rows: ``correct`` (top-1), ``count``, ``loss`` (cross-entropy), float32."""
    scores = logits(params, batch_stats, batch["images"], model=model)
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(scores, axis=-1) == batch["labels"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, batch["labels"])
    return {"correct": jnp.sum(correct * mask), "count": jnp.sum(mask), "loss": jnp.sum(loss * mask)}


def init_state(model: Classifier, tx, rng: jax.Array, image_shape: tuple[int, ...]) -> ClassifierState:
    """A fresh state (boxed parameters) for ``image_shape = (B, H, W, C)``."""
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32), train=False)
    return ClassifierState.create(
        apply_fn=None, params=variables["params"], tx=tx, batch_stats=variables.get("batch_stats", {})
    )
