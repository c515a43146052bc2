"""k-nearest-neighbour classification on frozen encoder features.

Features are the encoder's pooled features (``EncoderOutput.pooled``: the mean of
its patch tokens after its final norm, every token visible), L2-normalised; a query's class scores are the neighbours'
``exp(similarity / temperature)`` summed per class (the weighted kNN of
Wu et al. 2018, as used by DINO), with ``k`` neighbours.

Beside it, the same kNN on the raw pixels (the normalised image, flattened and
L2-normalised; same memory bank, queries, ``k`` and temperature), so the number
says what pretraining added: ``knn_raw_pixels_accuracy``. It does not depend on
the parameters, so it is computed once per evaluator, and only for images of at
most ``RAW_PIXEL_LIMIT`` values (Fashion-MNIST, CIFAR): an ImageNet memory bank
of raw pixels would take tens of gigabytes.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from prmim_jax import sharding
from prmim_jax.data import pipeline, schema, transforms
from prmim_jax.evaluate import check_batch_size

RAW_PIXEL_LIMIT = 4096  # values per image up to which the raw-pixel kNN runs beside the encoder's


def default_config() -> dict:
    """``evals.<name>`` keys of a kNN evaluator (memory bank from ``data.split``, queries from ``data.eval_split``)."""
    return dict(every=0, k=20, temperature=0.07, train_examples=10000, test_examples=10000, batch_size=256)


PREDICTS = "pooled"  # the method's predict function this evaluator reads (``prmim_jax.methods``)
MISSING = "evaluator 'knn' needs an encoder's pooled features; method {method} has none."


class Evaluator:
    """kNN top-1 accuracy of the pooled features of the encoder the method leaves (its ``pooled`` predictions)."""

    def __init__(self, predict_fn, *, data: ml_collections.ConfigDict, section, placement: sharding.Placement):
        self.placement, self.data, self.section, self.every = placement, data, section, section.every
        check_batch_size("kNN", section.batch_size, placement)
        for key in ("train_examples", "test_examples"):
            if not isinstance(section[key], int) or section[key] < 1:
                raise ValueError(f"kNN {key}={section[key]!r} must be a positive integer; change {key}.")
        if not section.temperature > 0:
            raise ValueError(f"kNN temperature={section.temperature!r} must be positive (DINO's 0.07); change it.")
        if section.k < 1 or section.k > section.train_examples:
            raise ValueError(
                f"kNN k={section.k} must lie in [1, train_examples={section.train_examples}]; change k or train_examples."
            )
        # The memory bank comes from data.split and the queries from data.eval_split: both must exist, and the
        # bank hold k images (known without reading them, except for TFDS).
        schema.check_split(data, data.split, "data.split")
        schema.check_split(data, data.eval_split, "data.eval_split")
        bank = schema.split_size(data, data.split, at_most=section.k)
        if bank is not None and bank < section.k:
            raise ValueError(
                f"kNN k={section.k} exceeds the {bank} images of data.split={data.split!r}, its memory bank; "
                f"set k to at most {bank}."
            )
        self._features = jax.jit(lambda variables, images: unit_norm(predict_fn(variables, images)))
        mean, std = tuple(data.mean), tuple(data.std)
        self._raw_features = jax.jit(lambda images: raw_pixel_features(transforms.normalize_images(images, mean, std)))
        self.raw_pixels_accuracy = None  # computed at the first evaluation (it does not change)
        self.with_raw_pixels = data.image_size**2 * data.channels <= RAW_PIXEL_LIMIT

    def _batches(self, split: str, limit: int):
        batch = self.section.batch_size
        dataset = pipeline.eval_dataset(
            pipeline.in_process(self.data),
            split,
            batch_size=batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return itertools.islice(iter(dataset), math.ceil(limit / batch))

    def run(self, variables) -> dict:
        section = self.section
        raw = self.with_raw_pixels and self.raw_pixels_accuracy is None

        def features(local_images):
            images = self.placement.global_batch(local_images)
            with self.placement.active():
                encoded = self._features(variables, images)
                return (encoded, self._raw_features(images)) if raw else (encoded,)

        train_features, train_labels = collect_features(
            features, self._batches(self.data.split, section.train_examples)
        )
        test_features, test_labels = collect_features(
            features, self._batches(self.data.eval_split, section.test_examples)
        )
        options = dict(k=section.k, temperature=section.temperature)
        results = {
            "knn_accuracy": knn_accuracy(train_features[0], train_labels, test_features[0], test_labels, **options)
        }
        if raw:
            self.raw_pixels_accuracy = knn_accuracy(
                train_features[1], train_labels, test_features[1], test_labels, **options
            )
        if self.raw_pixels_accuracy is not None:
            results["knn_raw_pixels_accuracy"] = self.raw_pixels_accuracy
        return results

    def summary(self, results: dict) -> str:
        line = f"final kNN top-1 accuracy ({self.data.eval_split}, k={self.section.k}): {results['knn_accuracy']:.4f}"
        if "knn_raw_pixels_accuracy" in results:
            line += f"; on raw pixels (same images and k): {results['knn_raw_pixels_accuracy']:.4f}"
        return line


def unit_norm(features: jax.Array) -> jax.Array:
    """``[B, D]`` -> ``[B, D] float32`` of unit L2 norm (kNN's cosine similarity is then a dot product)."""
    features = features.astype(jnp.float32)
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True).clip(1e-12)


def raw_pixel_features(images: jax.Array) -> jax.Array:
    """``images [B, H, W, C]`` (normalised) -> ``[B, H * W * C]`` float32, unit L2 norm: kNN's raw-pixel baseline."""
    return unit_norm(images.reshape(images.shape[0], -1))


def collect_features(feature_fn, batches) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Runs ``feature_fn`` (this process's images -> a tuple of global feature arrays) over every batch.

    Returns host ``((features [M, D_i] for each array), labels [M])`` of the real rows.

    Batches carry ``images``, ``labels`` and a ``mask`` of real (not padding)
    rows; with several processes every process gets every row.
    """
    features, labels = [], []
    for batch in batches:
        outputs = feature_fn(batch["images"])
        gathered_labels = np.asarray(multihost_utils.process_allgather(batch["labels"], tiled=True))
        mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)).astype(bool)
        features.append([np.asarray(multihost_utils.process_allgather(o, tiled=True))[mask] for o in outputs])
        labels.append(gathered_labels[mask])
    return tuple(np.concatenate(columns) for columns in zip(*features, strict=True)), np.concatenate(labels)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of weighted kNN; features ``[M, D]`` unit-norm, labels ``[M]`` int."""
    if len(train_features) < k:
        raise ValueError(f"kNN with k={k} needs at least {k} training examples, got {len(train_features)}.")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, top, axis=1) / temperature)
        votes = np.zeros((len(top), num_classes))
        np.add.at(votes, (np.arange(len(top))[:, None], train_labels[top]), weights)
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / len(test_features)
