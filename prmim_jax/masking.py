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

Samplers run on the host (numpy), in the data pipeline's workers. Each image
draws its own random numbers (``draw_noise``: ``[2, N]`` uniforms, from the
per-example generator of a grain ``RandomMap``), so an image's token sets
depend only on its own seed, never on the rest of its batch; the samplers then
work on a whole batch of noise at once (``sample``), vectorised:

- ``random``: MAE's masking, nothing thrown.
- ``random_throw``: plain partial reconstruction; the thrown tokens are a
  uniform random subset of the masked ones.
- ``furthest``: the paper's Alg. 1. Among the masked tokens the first decoded
  token is random; each next one maximises its minimum Euclidean grid distance
  to those already decoded; the rest are thrown. Ties break at random.
- ``furthest_seeded``: as ``furthest`` with the visible tokens counted as
  already retained, so thrown tokens land far from every decoder input.

In every sampler ``noise[:, 0]`` chooses the visible tokens exactly as MAE does,
so two samplers given the same noise see the same visible tokens.
"""

from __future__ import annotations

import dataclasses
import functools
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

    def squared_distances(self) -> np.ndarray:
        """``[N, N] float32`` squared Euclidean grid distance between every pair of tokens."""
        return _squared_distances(self.grid)


@functools.cache
def _squared_distances(grid: tuple[int, int]) -> np.ndarray:
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    table = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


SAMPLERS = ("random", "random_throw", "furthest", "furthest_seeded")
NOISE_ROWS = 2  # row 0 picks the visible tokens, row 1 the thrown ones (or breaks ties)


def draw_noise(rng: np.random.Generator, layout: TokenLayout) -> np.ndarray:
    """One image's random numbers for any sampler: ``[2, N] float32`` uniforms in [0, 1)."""
    return rng.random((NOISE_ROWS, layout.num_tokens), dtype=np.float32)


def check_sampler(name: str, layout: TokenLayout) -> None:
    """Raises ``ValueError`` when ``name`` is unknown or cannot serve ``layout``'s throwing ratio."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown token sampler {name!r}; choose one of {SAMPLERS}.")
    if name == "random" and layout.num_thrown:
        raise ValueError(
            f"sampler 'random' (MAE) throws nothing but throw_ratio={layout.throw_ratio}; "
            "use 'random_throw', 'furthest' or 'furthest_seeded', or set throw_ratio=0."
        )


def sample(name: str, noise: np.ndarray, layout: TokenLayout) -> TokenIds:
    """Token sets of a batch from its per-image noise.

    Args:
      name: one of ``SAMPLERS``.
      noise: ``[B, 2, N] float`` from ``draw_noise`` per image (or ``[B, N]``
        for ``random``).
      layout: static token counts.

    Returns:
      ``TokenIds`` with the layout's static shapes. ``visible`` is in
      ascending order of ``noise[:, 0]`` (MAE's ``ids_keep``); ``decoded`` is
      in pick order for the furthest samplers; ``thrown`` is in ascending id.
    """
    check_sampler(name, layout)
    noise = np.asarray(noise)
    if name == "random" and noise.ndim == 2:
        noise = noise[:, None]
    if noise.ndim != 3 or noise.shape[2] != layout.num_tokens:
        raise ValueError(f"noise has shape {noise.shape}; expected [batch, {NOISE_ROWS}, {layout.num_tokens}].")
    order = np.argsort(noise[:, 0], axis=1, kind="stable").astype(np.int32)
    visible, masked = order[:, : layout.num_visible], order[:, layout.num_visible :]
    if name == "random":
        return TokenIds(visible, masked, np.zeros((noise.shape[0], 0), np.int32))
    if name == "random_throw":
        throw_order = np.argsort(np.take_along_axis(noise[:, 1], masked, axis=1), axis=1, kind="stable")
        shuffled = np.take_along_axis(masked, throw_order, axis=1)
        thrown = np.sort(shuffled[:, : layout.num_thrown], axis=1)
        return TokenIds(visible, shuffled[:, layout.num_thrown :], thrown)
    decoded = _furthest_points(visible, masked, noise[:, 1], layout, seeded=name == "furthest_seeded")
    return TokenIds(visible, decoded, _remaining(layout, visible, decoded))


def random_masking(noise: np.ndarray, layout: TokenLayout) -> TokenIds:
    """MAE's masking: the ``N_vis`` tokens with the smallest noise stay visible.

    ``noise [B, N]`` -> ``TokenIds`` with ``visible`` the first ``N_vis``
    entries of the ascending argsort of ``noise`` and ``decoded`` the rest, both
    in argsort order (as the official MAE's ``ids_keep`` and its masked
    remainder), ``thrown`` ``[B, 0]``.
    """
    noise = np.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] != layout.num_tokens:
        raise ValueError(f"noise has shape {noise.shape}; expected [batch, {layout.num_tokens}].")
    return sample("random", noise, layout)


def _furthest_points(visible, masked, tie_noise, layout: TokenLayout, seeded: bool) -> np.ndarray:
    """Greedy furthest-point sampling of ``N_dec`` masked tokens: ``[B, N_dec] int32`` in pick order.

    ``score[b, n]`` is token n's squared distance to the nearest retained token
    plus its tie-break noise in [0, 1); squared grid distances are integers, so
    the noise only orders tokens at equal distance. Visible tokens score -inf
    (never picked); retained tokens score below 1 (distance 0) and every
    unretained masked token at least 1, so nothing is picked twice.
    """
    batch = visible.shape[0]
    distances = layout.squared_distances()
    rows = np.arange(batch)[:, None]
    tie = tie_noise.astype(np.float32)
    # Farther than any two tokens, and finite so the tie-break noise still counts.
    beyond_grid = float(2 * (layout.grid[0] ** 2 + layout.grid[1] ** 2))
    score = np.full((batch, layout.num_tokens), beyond_grid, np.float32)
    if seeded:
        for v in range(visible.shape[1]):
            np.minimum(score, distances[visible[:, v]], out=score)
    score += tie
    score[rows, visible] = -np.inf
    picks = np.empty((batch, layout.num_decoded), np.int32)
    for k in range(layout.num_decoded):
        pick = np.argmax(score, axis=1)
        picks[:, k] = pick
        np.minimum(score, distances[pick] + tie, out=score)
    return picks


def _remaining(layout: TokenLayout, visible: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """The ids in neither set, ascending: ``[B, N - N_vis - N_dec] int32``."""
    batch = visible.shape[0]
    taken = np.zeros((batch, layout.num_tokens), bool)
    rows = np.arange(batch)[:, None]
    taken[rows, visible] = True
    taken[rows, decoded] = True
    return np.nonzero(~taken)[1].reshape(batch, -1).astype(np.int32)


def uncovered_fraction(ids: TokenIds, layout: TokenLayout, window: int) -> float:
    """Fraction of thrown tokens with no visible or decoded token inside their ``window x window`` box.

    The statistic behind the paper's Fig. 5: such a thrown token gets nothing
    to aggregate from a ``window``-sized depth-wise kernel.
    """
    if ids.thrown.shape[1] == 0:
        return 0.0
    batch = ids.visible.shape[0]
    grid_h, grid_w = layout.grid
    kept = np.zeros((batch, layout.num_tokens), np.int32)
    rows = np.arange(batch)[:, None]
    kept[rows, ids.visible] = 1
    kept[rows, ids.decoded] = 1
    radius = window // 2
    padded = np.pad(kept.reshape(batch, grid_h, grid_w), ((0, 0), (radius, radius), (radius, radius)))
    boxes = np.lib.stride_tricks.sliding_window_view(padded, (window, window), axis=(1, 2)).sum(axis=(-1, -2))
    neighbours = np.take_along_axis(boxes.reshape(batch, -1), ids.thrown, axis=1)
    return float(np.mean(neighbours == 0))


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
