"""What every encoder gives the classifiers, the evaluators and the exporters: one output type.

Each encoder that a method leaves (``Method.encoder``) has a ``features(images,
deterministic=True) -> EncoderOutput`` method and says whether its tokens come out
normalised (``tokens_normalized``), so nothing that reads features needs to know
which architecture made them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class EncoderOutput(NamedTuple):
    """``tokens [B, N, D]``: the patch tokens in grid order (row-major), after the encoder's final norm where it
    has one; ``cls [B, D]``: the cls token, or None (a Swin has none); ``pooled [B, D] float32``: the mean of
    ``tokens``, the features kNN reads and a mean-pooling head starts from."""

    tokens: jax.Array
    cls: jax.Array | None
    pooled: jax.Array


def from_sequence(sequence: jax.Array) -> EncoderOutput:
    """``[B, 1 + N, D]``, the cls token first (a ViT's output) -> ``EncoderOutput``."""
    patches = sequence[:, 1:]
    return EncoderOutput(patches, sequence[:, 0], jnp.mean(patches.astype(jnp.float32), axis=1))
