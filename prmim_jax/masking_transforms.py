"""The token samplers of ``prmim_jax.masking`` as grain transforms, for a method's host-side batches.

``DrawTokenNoise`` gives each image its own noise (a ``RandomMap``: seeded by the
image's position in the global stream), ``SampleTokens`` turns a batch's noise into
its token sets, so an image's token sets never depend on its batch or process.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from prmim_jax import masking


@dataclasses.dataclass(frozen=True)
class DrawTokenNoise(grain.transforms.RandomMap):
    """Adds ``'token_noise'``: this image's ``[2, N] float32`` from ``masking.draw_noise``."""

    layout: masking.TokenLayout

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return element | {"token_noise": masking.draw_noise(rng, self.layout)}


@dataclasses.dataclass(frozen=True)
class SampleTokens(grain.transforms.Map):
    """A training batch -> the same with token sets drawn by ``sampler`` over the whole batch at once.

    Input: ``{'images', 'labels', 'token_noise': [B, 2, N] float32, ...}``.
    Output: the same without ``token_noise`` and with ``'ids_visible': [B,
    N_vis]``, ``'ids_decoded': [B, N_dec]``, ``'ids_thrown': [B, N_thr]`` int32
    (the convention of ``prmim_jax.masking``).
    """

    sampler: str
    layout: masking.TokenLayout

    def __post_init__(self):
        masking.check_sampler(self.sampler, self.layout)

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        ids = masking.sample(self.sampler, batch.pop("token_noise"), self.layout)
        return batch | {"ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}
