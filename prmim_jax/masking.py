"""The token index convention, defined once, and the host-side token samplers.

A ``g_h x g_w`` token grid has ``N = g_h * g_w`` tokens, numbered row-major:
token ``i`` sits at row ``i // g_w`` and column ``i % g_w`` (the order of
``patchify`` and of the official MAE). A sampler splits the tokens of every
image into three disjoint sets whose union is ``range(N)``:

- ``ids_visible`` ``[B, N_vis] int32``: the tokens the encoder sees.
- ``ids_decoded`` ``[B, N_dec] int32``: masked tokens the decoder reconstructs.
- ``ids_thrown``  ``[B, N_thr] int32``: masked tokens the decoder skips
  (partial reconstruction); PR-MIM's aggregation reconstructs them.

Sizes follow the official MAE and the paper's Table 1, with masking ratio
``rho_e`` and throwing ratio ``rho_d`` both fractions of ``N``:

- ``N_vis = int(N * (1 - rho_e))``  (MAE's ``len_keep``), ``N_mask = N - N_vis``
- ``N_thr = round(N * rho_d)``, ``N_dec = N_mask - N_thr``

so every batch of a config has one static shape. The order of ids inside a set
carries no meaning to the model (attention is permutation-equivariant and
position embeddings are gathered by id); model outputs follow the order of the
ids they were given.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


class TokenIds(NamedTuple):
    """Per-image token sets; see the module docstring for the convention."""

    visible: np.ndarray  # [B, N_vis] int32
    decoded: np.ndarray  # [B, N_dec] int32
    thrown: np.ndarray  # [B, N_thr] int32


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Static token counts of one config: grid shape, masking and throwing ratios.

    Raises ``ValueError`` on construction when the ratios are impossible, so a
    bad config fails before anything compiles.
    """

    grid: tuple[int, int]
    mask_ratio: float
    throw_ratio: float = 0.0

    def __post_init__(self):
        grid_h, grid_w = self.grid
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"token grid {self.grid} is empty: image size must be at least one patch.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} must lie in [0, 1): the encoder needs at least one visible token."
            )
        if not 0.0 <= self.throw_ratio <= self.mask_ratio:
            raise ValueError(
                f"throw_ratio={self.throw_ratio} must lie in [0, mask_ratio={self.mask_ratio}]: "
                "only masked tokens can be thrown; lower throw_ratio or raise mask_ratio."
            )
        if self.num_visible < 1:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} leaves no visible token on a {grid_h}x{grid_w} grid; lower it."
            )
        if self.num_decoded < 1 and self.num_masked > 0:
            raise ValueError(
                f"throw_ratio={self.throw_ratio} throws all {self.num_masked} masked tokens of a "
                f"{grid_h}x{grid_w} grid; the decoder must reconstruct at least one. Lower throw_ratio."
            )

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_visible(self) -> int:
        return int(self.num_tokens * (1 - self.mask_ratio))

    @property
    def num_masked(self) -> int:
        return self.num_tokens - self.num_visible

    @property
    def num_thrown(self) -> int:
        return round(self.num_tokens * self.throw_ratio)

    @property
    def num_decoded(self) -> int:
        return self.num_masked - self.num_thrown

    def token_coordinates(self) -> np.ndarray:
        """``[N, 2] int32`` (row, column) of every token id."""
        rows, cols = np.divmod(np.arange(self.num_tokens), self.grid[1])
        return np.stack([rows, cols], axis=1).astype(np.int32)


def random_masking(noise: np.ndarray, layout: TokenLayout) -> TokenIds:
    """MAE's masking: the ``N_vis`` tokens with the smallest noise stay visible.

    Args:
      noise: ``[B, N] float``, one value per token (uniform in MAE).
      layout: the static token counts; nothing is thrown here, so
        ``layout.throw_ratio`` must be 0.

    Returns:
      ``TokenIds`` with ``visible`` the first ``N_vis`` entries of the ascending
      argsort of ``noise`` and ``decoded`` the rest, both in argsort order (as
      the official MAE's ``ids_keep`` and its masked remainder), ``thrown``
      ``[B, 0]``.
    """
    noise = np.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] != layout.num_tokens:
        raise ValueError(f"noise has shape {noise.shape}; expected [batch, {layout.num_tokens}].")
    if layout.num_thrown:
        raise ValueError("random_masking throws nothing; use a throwing sampler for throw_ratio > 0.")
    order = np.argsort(noise, axis=1, kind="stable").astype(np.int32)
    return TokenIds(
        visible=order[:, : layout.num_visible],
        decoded=order[:, layout.num_visible :],
        thrown=np.zeros((noise.shape[0], 0), np.int32),
    )


def check_token_ids(ids: TokenIds, layout: TokenLayout) -> None:
    """Raises ``ValueError`` unless ``ids`` has the layout's shapes and partitions every grid."""
    expected = {
        "visible": layout.num_visible,
        "decoded": layout.num_decoded,
        "thrown": layout.num_thrown,
    }
    batch = ids.visible.shape[0]
    for name, count in expected.items():
        shape = getattr(ids, name).shape
        if shape != (batch, count):
            raise ValueError(f"ids_{name} has shape {shape}; the layout expects {(batch, count)}.")
    every = np.sort(np.concatenate(ids, axis=1), axis=1)
    if not np.array_equal(every, np.broadcast_to(np.arange(layout.num_tokens), every.shape)):
        raise ValueError("visible, decoded and thrown ids must partition range(N) for every image.")
