"""A classifier's top-1 accuracy and mean cross-entropy over a whole split (padding rows excluded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from prmim_jax import sharding
from prmim_jax.data import pipeline, schema
from prmim_jax.evaluate import check_batch_size


def default_config() -> dict:
    """``evals.<name>`` keys: ``split`` (None: ``data.eval_split``) and the global ``batch_size``."""
    return dict(every=0, batch_size=256, split=config_dict.placeholder(str))  # typed: --config...split=x works


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums over the real rows (``mask [B] bool``) of ``logits [B, K]``: ``correct`` (top-1), ``count``, ``loss``."""
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"correct": jnp.sum(correct * mask), "count": jnp.sum(mask), "loss": jnp.sum(loss * mask)}


PREDICTS = "logits"  # the method's predict function this evaluator reads (``prmim_jax.methods``)
MISSING = (
    "evaluator 'accuracy' needs a classifier but method {method} has no logits; use it with method 'classify', "
    "or remove it from config.evals."
)


class Evaluator:
    """``{'accuracy', 'eval_loss'}`` of the method's ``logits`` on ``split``."""

    def __init__(self, predict_fn, *, data: ml_collections.ConfigDict, section, placement: sharding.Placement):
        check_batch_size("accuracy", section.batch_size, placement)
        self.placement, self.data, self.section, self.every = placement, data, section, section.every
        self.split = section.split or data.eval_split
        schema.check_split(data, self.split, "split" if section.split else "data.eval_split")

        def step(variables, batch):
            return eval_sums(predict_fn(variables, batch["images"]), batch["labels"], batch["mask"])

        self._step = jax.jit(step)

    def run(self, variables) -> dict:
        dataset = pipeline.eval_dataset(
            pipeline.in_process(self.data),
            self.split,
            batch_size=self.section.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        totals = {"correct": 0.0, "count": 0.0, "loss": 0.0}
        with self.placement.active():
            for batch in dataset:
                sums = self._step(variables, self.placement.global_batch(batch))
                for key, value in jax.device_get(sums).items():
                    totals[key] += float(value)
        return {"accuracy": totals["correct"] / totals["count"], "eval_loss": totals["loss"] / totals["count"]}

    def summary(self, results: dict) -> str:
        return f"final top-1 accuracy ({self.split}): {results['accuracy']:.4f}"
