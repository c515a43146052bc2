"""The reconstruction picture of a run (the paper's Fig. 7 for one method), drawn every ``every`` steps and at the end.

The rows (original, visible tokens, reconstruction, token map), each labelled, are ``prmim_jax.pictures``'.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from prmim_jax import pictures, sharding
from prmim_jax.data import pipeline, schema

PREDICTS = "picture"  # the method's predict function this evaluator reads (``prmim_jax.methods``)
MISSING = (
    "evaluator 'reconstruction' needs a method that reconstructs images; {method} does not. "
    "Remove it from config.evals."
)


def default_config() -> dict:
    """``evals.<name>`` keys: how many evaluation images, and the seed of their token sets."""
    return dict(every=0, num_images=8, seed=0)


class Evaluator:
    """``{'reconstruction': uint8 picture}`` of the method's ``picture`` on the first images of ``data.eval_split``."""

    def __init__(self, predict_fn, *, data: ml_collections.ConfigDict, section, placement: sharding.Placement):
        del placement  # the picture is drawn on the host from parameters gathered whole
        self.predict_fn, self.data, self.section, self.every = predict_fn, data, section, section.every
        schema.check_split(data, data.eval_split, "data.eval_split")  # its pictures come from there
        if not isinstance(section.num_images, int) or section.num_images < 1:
            raise ValueError(f"num_images={section.num_images!r} must be a positive integer; change num_images.")
        self._images = None  # read on first use: runs without pictures never open the eval split for them

    def run(self, variables) -> dict:
        if self._images is None:
            dataset = pipeline.eval_dataset(pipeline.in_process(self.data), batch_size=self.section.num_images)
            self._images = np.asarray(next(iter(dataset))["images"])
        variables = multihost_utils.process_allgather(variables, tiled=True)  # whole on every host
        picture = self.predict_fn(variables, self._images, self.section.seed)
        rows = picture.with_token_map()
        scale = pictures.picture_scale(self.data.image_size)
        return {"reconstruction": pictures.tile(rows, scale=scale, labels=pictures.ROW_LABELS)}

    def summary(self, results: dict) -> str:
        return f"reconstruction picture: {results['reconstruction'].shape[1]}x{results['reconstruction'].shape[0]}"
