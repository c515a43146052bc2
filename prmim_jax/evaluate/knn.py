"""k-nearest-neighbour classification on frozen encoder features.

Features are the mean of the encoder's patch tokens after its final norm (every
token visible), L2-normalised; a query's class scores are the neighbours'
``exp(similarity / temperature)`` summed per class (the weighted kNN of
Wu et al. 2018, as used by DINO), with ``k`` neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from prmim_jax.models import vit


def encoder_features(encoder: vit.Encoder, encoder_params, images: jax.Array) -> jax.Array:
    """``images [B, H, W, C]`` -> ``[B, width]`` float32, unit L2 norm."""
    tokens = encoder.apply({"params": encoder_params}, images)
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-12)


def collect_features(feature_fn, batches) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``feature_fn`` (this process's images -> global features) over every batch.

    Returns host ``(features [M, D], labels [M])`` of the real rows.

    Batches carry ``images``, ``labels`` and a ``mask`` of real (not padding)
    rows; with several processes every process gets every row.
    """
    features, labels = [], []
    for batch in batches:
        out = feature_fn(batch["images"])
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        gathered_labels = np.asarray(multihost_utils.process_allgather(batch["labels"], tiled=True))
        mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)).astype(bool)
        features.append(out[mask])
        labels.append(gathered_labels[mask])
    return np.concatenate(features), np.concatenate(labels)


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
