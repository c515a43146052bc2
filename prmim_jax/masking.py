"""The token index convention, defined once, and the host-side token samplers.

A ``g_h x g_w`` token grid has ``N = g_h * g_w`` tokens, numbered row-major:
token ``i`` sits at row ``i // g_w`` and column ``i % g_w`` (the order of
``patchify`` and of the official MAE). A sampler splits the tokens of every
image into three disjoint sets whose union is ``range(N)``:

- ``ids_visible`` ``[B, N_vis] int32``: the tokens the encoder sees.
- ``ids_decoded`` ``[B, N_dec] int32``: masked tokens the decoder reconstructs.
- ``ids_thrown``  ``[B, N_thr] int32``: masked tokens the decoder skips
  (partial reconstruction); PR-MIM's aggregation reconstructs them.

(One exception, VideoMAE V2's own running-cell decoder,
``running_cell_decoder='videomae'``: there ``ids_decoded`` and ``ids_thrown``
split all N positions and ``ids_visible`` overlaps both; see "Running cell".)

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
- ``running_cell``: VideoMAE V2's running-cell decoder masking on one image
  (``running_cell_patterns``): a 2x2 cell tiled over the grid marks the
  positions the decoder skips; the masked tokens there are thrown first.
- ``amt``: AMT's attention-driven masking and throwing (``multinomial_order``
  over per-token weights from an attention map, ``prmim_jax.attention_maps``):
  the first-drawn tokens are decoded, the next thrown, the last visible.

In every sampler but ``amt`` ``noise[:, 0]`` chooses the visible tokens exactly
as MAE does, so two samplers given the same noise see the same visible tokens;
``amt`` does too while its weights are uniform (before its first map), and
favours low-attention tokens for the visible set once they are not.

**Running cell** (``running_cell``; VideoMAE V2, Wang et al. 2023,
``OpenGVLab/VideoMAEv2`` ``dataset/masking_generator.py``: ``Cell``,
``RunningCellMaskingGenerator``). VideoMAE V2 fills a 2x2 cell with ``k =
int(4 r)`` ones (positions the decoder skips) then ``4 - k`` zeros, reads it
from a pointer ``p`` (``cell[(arange(4) + p) % 4]``, row-major 2x2), tiles it
over each frame and advances the pointer by one from frame to frame, starting
from a random pointer per video. An image has no frames: here the pointer is
drawn per image, ``p = floor(4 u)`` with ``u = noise[:, 1, 0]``, so the four
shifts of the cell are equally likely and consecutive pointers are the
published frame-to-frame sequence. Ratios: the cell throws 1, 2 or 3 of its 4
tokens, so ``throw_ratio`` must be 0.25, 0.5 or 0.75 (anything else is refused
with the fix), or 0, VideoMAE V2's decoder ratio 0: no decoder masking, nothing
thrown. Static sizes: VideoMAE V2 feeds the decoder every position the
cell keeps, visible ones included, and masks the loss; here the decoder sees
masked tokens only (``N_dec = N_mask - N_thr`` as for every sampler), so the
``N_thr`` thrown tokens are the masked ones the pattern skips, in random order
(``frac(4 u)`` of ``noise[:, 1]``, independent of the pointer), topped up
with random pattern-kept masked tokens when random visible tokens took some of
the pattern's positions (on even grids the pattern skips exactly ``N_thr``
positions, so every decoded token sits where the cell keeps one). Odd grids:
the pattern is the cell's periodic extension cut at the border (the last row
and column repeat the cell's first row and column), so it skips about, not
exactly, ``N_thr`` positions; surplus pattern-skipped masked tokens are then
decoded, in the same random order.

VideoMAE V2's own semantics (``TokenLayout(running_cell_decoder='videomae')``;
``models/modeling_pretrain.py`` L340-358, ``engine_for_pretraining.py``
L98-105) is the other choice: the cell marks the positions the decoder keeps
among all N tokens, visible ones included, irrespective of the encoder's mask;
the decoder reads the encoder's visible tokens plus a mask token at every kept
position (a visible kept position appears twice: its encoder token and a mask
token), and the loss covers the masked kept positions only
(``labels = images_patch[~decode_masked_pos]``, ``cal_loss_mask =
bool_masked_pos[~decode_masked_pos]``). Here ``ids_decoded`` ``[B, N - N_thr]``
are the cell-kept positions and ``ids_thrown`` ``[B, N_thr]`` the cell-skipped
ones (both ascending id; they split ``range(N)``, ``ids_visible`` is MAE's as
for every sampler), and the loss weighs a decoded position 1 where it is
masked, 0 where visible. Only even grids (VideoMAE V2 tiles ``height // 2``
cells; the pattern then skips exactly ``N_thr = N * throw_ratio`` positions),
single-token masks and throw ratios 0.25, 0.5, 0.75 serve it.

The thrown-token accounting of the two, at mask ratio 0.75 and throw (cell)
ratio 0.5 on a 14x14 grid (N = 196, N_vis = 49 visible, 147 masked; the
``videomae`` counts are hypergeometric, each masked token lands on a kept
position with probability 1/2, standard deviation 3.0 tokens):

=========================  ============================  ==================================
                           ``masked`` (ours, default)    ``videomae`` (VideoMAE V2's)
=========================  ============================  ==================================
``ids_decoded``            49 masked tokens              98 cell-kept positions
decoder input (no cls)     49 visible + 49 mask = 98     49 visible + 98 mask = 147
reconstructed (the loss)   49 (25% of N): every decoded  73.5 on average (37.5%): the masked
                           token                         kept positions
masked, never              98 (50% of N, exactly):       73.5 on average (37.5%): the masked
reconstructed              ``ids_thrown``                cell-skipped positions
visible, decoded           0                             24.5 on average (12.5%), no loss
=========================  ============================  ==================================

(MAE without throwing: 49 + 147 = 196 decoder tokens, 147 reconstructed.) Ours
keeps the decoder's work fixed at the cell's share of the masked tokens and
reconstructs all of it; VideoMAE V2's spends a quarter of its 147 decoder
tokens on positions the encoder saw and that carry no loss, reconstructs 24.5
more masked tokens on average, and its count varies from image to image.

**AMT** (``amt``; Liu, Gui and Luo, AAAI 2023, ``guijiejie/AMT``
``mae-AMT/models_mae.py``: ``amt_masking_throwing``). AMT draws every token
without replacement with probability proportional to its weight
(``torch.multinomial(weights, L)``): the first ``int(L * mask_ratio)`` drawn are
masked and reconstructed, the next ``int(L * throw_ratio)`` thrown, the rest
visible, so high-attention tokens are reconstructed, low-attention ones seen.
The weights are the attention map itself, with no temperature and no mixing
with uniform noise. ``multinomial_order`` draws the same order from one
uniform per token (``noise[:, 0]``): the exponential race, token ``i`` at key
``-log(u_i) / w_i``, smallest first. Here ``N_dec`` decoded tokens come first,
then ``N_thr`` thrown, then ``N_vis`` visible (the index convention's sizes;
AMT's ``mask_ratio`` is our ``rho_e - rho_d``). With uniform weights the last
``N_vis`` drawn are the ``N_vis`` smallest ``u``: MAE's visible tokens.

**SimMIM's unit masks** (``TokenLayout(mask_unit=u)``): SimMIM masks square
units of ``u x u`` tokens (``u = mask_patch_size // patch_size``: 32-pixel
units are 2x2 tokens of ViT-B/16, a 7x7 unit grid at 224), with its
``MaskGenerator``'s count: ``ceil(U * mask_ratio)`` of the ``U`` units are
masked (30 of 49 at 0.6, so 120 of 196 tokens), where MAE's rule would give
``N - int(N * (1 - mask_ratio))`` tokens. The same four samplers serve unit
layouts: ``noise[:, 0, :U]`` picks the visible units (smallest noise
visible), and the thrown tokens are chosen among the masked ones either token
by token (``throw_granularity='token'``, the default: Alg. 1 on the token
grid, ``N_thr = round(N * throw_ratio)``) or unit by unit
(``throw_granularity='unit'``: Alg. 1 on the unit grid's coordinates,
``round(U * throw_ratio)`` whole units thrown).

Why tokens by default: throwing whole units leaves 2x2 holes that a small
window cannot reach, while token throwing keeps a decoded token of the same
unit next to most thrown tokens. Those are mask tokens, so nothing leaks from
the pixels of a masked unit, and the paper throws "a subset of masked tokens".
With furthest sampling at SimMIM's rho_d, no thrown token is left without a
visible or decoded token in its 3x3 box when thrown as tokens, and a few
percent are when thrown as units; token sampling is slower than unit
sampling but far faster than a core decodes images. The counts and speeds:
``benchmarks/results/samplers_cpu.md`` (``benchmarks/samplers.py``).
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

    ``mask_unit = None`` is MAE's token masking. ``mask_unit = u`` is SimMIM's
    masking of ``u x u``-token units (see the module docstring): ``mask_ratio``
    is then a fraction of the units, rounded up as SimMIM's ``MaskGenerator``
    does, and ``throw_granularity`` (``'token'`` or ``'unit'``) says whether the
    thrown tokens are chosen one by one or as whole units.

    ``running_cell_decoder`` (``RUNNING_CELL_DECODERS``) is ``'masked'`` for
    every sampler: decoded and thrown tokens are masked ones. ``'videomae'``
    is VideoMAE V2's running-cell decoder (the module docstring, "Running
    cell"): ``N_dec = N - N_thr`` cell-kept positions, visible ones included,
    on an even grid of single tokens.

    Raises ``ValueError`` on construction when the ratios are impossible, so a
    bad config fails before anything compiles.
    """

    grid: tuple[int, int]
    mask_ratio: float
    throw_ratio: float = 0.0
    mask_unit: int | None = None
    throw_granularity: str = "token"
    running_cell_decoder: str = "masked"

    def __post_init__(self):
        grid_h, grid_w = self.grid
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"token grid {self.grid} is empty: image size must be at least one patch.")
        if self.mask_unit is not None and (self.mask_unit < 1 or grid_h % self.mask_unit or grid_w % self.mask_unit):
            raise ValueError(
                f"mask_unit={self.mask_unit} tokens does not tile the {grid_h}x{grid_w} token grid; choose a "
                "mask patch size (in pixels) that is a multiple of the patch size and divides the image size."
            )
        if self.throw_granularity not in THROW_GRANULARITIES:
            raise ValueError(f"throw_granularity={self.throw_granularity!r}; choose one of {THROW_GRANULARITIES}.")
        if self.throw_granularity == "unit" and self.mask_unit is None:
            raise ValueError("throw_granularity='unit' needs unit masks: set mask_unit (SimMIM) or throw tokens.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} must lie in [0, 1): the encoder needs at least one visible token."
            )
        if self.running_cell_decoder not in RUNNING_CELL_DECODERS:
            raise ValueError(
                f"running_cell_decoder={self.running_cell_decoder!r}; choose one of {RUNNING_CELL_DECODERS}."
            )
        if self.decodes_visible:
            self._check_videomae_decoder()
        elif not 0.0 <= self.throw_ratio <= self.mask_ratio:
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

    def _check_videomae_decoder(self) -> None:
        grid_h, grid_w = self.grid
        fix = "or set method.running_cell_decoder='masked' (ours)"
        if self.mask_unit is not None:
            raise ValueError(
                f"running_cell_decoder='videomae' masks single tokens, not units of {self.mask_unit}x{self.mask_unit}: "
                f"mask tokens (mask_unit=None), {fix}."
            )
        if grid_h % 2 or grid_w % 2:
            raise ValueError(
                f"running_cell_decoder='videomae' tiles VideoMAE V2's 2x2 cell over the token grid, which must have "
                f"even sides, not {grid_h}x{grid_w}: choose an image size that is an even number of patches (224 / 16 "
                f"= 14), {fix}."
            )
        if not 0.0 < self.throw_ratio < 1.0:
            raise ValueError(
                f"running_cell_decoder='videomae' needs a cell that skips tokens, so throw_ratio must be one of "
                f"{RUNNING_CELL_RATIOS}, not {self.throw_ratio} (at 0 VideoMAE V2 decodes the masked tokens, which is "
                f"running_cell_decoder='masked'); set method.throw_ratio."
            )

    @property
    def decodes_visible(self) -> bool:
        """Whether ``ids_decoded`` may hold visible tokens: VideoMAE V2's running-cell decoder."""
        return self.running_cell_decoder == "videomae"

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def unit_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the masking units; the token grid itself without ``mask_unit``."""
        unit = self.mask_unit or 1
        return (self.grid[0] // unit, self.grid[1] // unit)

    @property
    def num_units(self) -> int:
        return self.unit_grid[0] * self.unit_grid[1]

    @property
    def tokens_per_unit(self) -> int:
        return (self.mask_unit or 1) ** 2

    @property
    def num_visible(self) -> int:
        if self.mask_unit is not None:
            # SimMIM's MaskGenerator: int(np.ceil(token_count * mask_ratio)) units are masked.
            return self.num_tokens - self.tokens_per_unit * int(np.ceil(self.num_units * self.mask_ratio))
        return int(self.num_tokens * (1 - self.mask_ratio))

    @property
    def num_masked(self) -> int:
        return self.num_tokens - self.num_visible

    @property
    def num_thrown(self) -> int:
        if self.throw_granularity == "unit":
            return self.tokens_per_unit * round(self.num_units * self.throw_ratio)
        return round(self.num_tokens * self.throw_ratio)

    @property
    def num_decoded(self) -> int:
        if self.decodes_visible:
            return self.num_tokens - self.num_thrown
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


SAMPLERS = ("random", "random_throw", "furthest", "furthest_seeded", "running_cell", "amt")
THROW_GRANULARITIES = ("token", "unit")
NOISE_ROWS = 2  # row 0 picks the visible tokens, row 1 the thrown ones (or breaks ties)
RUNNING_CELL_RATIOS = (0.25, 0.5, 0.75)  # 1, 2 or 3 of the 2x2 cell's tokens skipped by the decoder
RUNNING_CELL_DECODERS = ("masked", "videomae")  # what ids_decoded are: masked tokens, or VideoMAE V2's kept positions


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
            f"use one of {SAMPLERS[1:]}, or set throw_ratio=0."
        )
    if layout.decodes_visible and name != "running_cell":
        raise ValueError(
            f"running_cell_decoder='videomae' is VideoMAE V2's running-cell decoder, not sampler {name!r}'s; set "
            "method.sampler='running_cell', or method.running_cell_decoder='masked'."
        )
    if name == "running_cell":
        if layout.throw_ratio and not any(np.isclose(layout.throw_ratio, r) for r in RUNNING_CELL_RATIOS):
            raise ValueError(
                f"sampler 'running_cell' skips 1, 2 or 3 tokens of VideoMAE V2's 2x2 cell, so throw_ratio must be "
                f"one of {RUNNING_CELL_RATIOS} (or 0: nothing thrown), not {layout.throw_ratio}; set "
                "method.throw_ratio to one of them or choose another sampler."
            )
        if layout.throw_granularity != "token":
            raise ValueError(
                "sampler 'running_cell' throws single tokens of its 2x2 cell; set method.throw_granularity='token'."
            )


def sample(name: str, noise: np.ndarray, layout: TokenLayout, weights: np.ndarray | None = None) -> TokenIds:
    """Token sets of a batch from its per-image noise.

    Args:
      name: one of ``SAMPLERS``.
      noise: ``[B, 2, N] float`` from ``draw_noise`` per image (or ``[B, N]``
        for ``random``).
      layout: static token counts.
      weights: ``amt`` only: ``[B, N] float >= 0``, each token's weight in the
        multinomial draw (its attention); None is uniform (AMT before its first
        map: random masking).

    Returns:
      ``TokenIds`` with the layout's static shapes. ``visible`` is in
      ascending order of ``noise[:, 0]`` (MAE's ``ids_keep``; ``amt``: last
      drawn first, the same order for uniform weights); ``decoded`` is in pick
      order for the furthest samplers and draw order for ``amt``; ``thrown``
      is in ascending id. Unit layouts (``mask_unit``) list whole units, see
      ``_sample_units``. ``running_cell`` with ``layout.decodes_visible``:
      ``decoded`` and ``thrown`` are the cell's kept and skipped positions,
      each in ascending id (the module docstring, "Running cell").
    """
    check_sampler(name, layout)
    noise = np.asarray(noise)
    if name == "random" and noise.ndim == 2:
        noise = noise[:, None]
    if noise.ndim != 3 or noise.shape[2] != layout.num_tokens:
        raise ValueError(f"noise has shape {noise.shape}; expected [batch, {NOISE_ROWS}, {layout.num_tokens}].")
    if weights is not None and weights.shape != (noise.shape[0], layout.num_tokens):
        raise ValueError(f"weights have shape {weights.shape}; expected [batch, {layout.num_tokens}].")
    if layout.mask_unit is not None:
        return _sample_units(name, noise, layout, weights)
    if name == "amt":
        order = multinomial_order(_uniform_if_none(weights, noise), noise[:, 0])
        num_masked = layout.num_masked
        visible = order[:, num_masked:][:, ::-1]
        thrown = np.sort(order[:, layout.num_decoded : num_masked], axis=1)
        return TokenIds(np.ascontiguousarray(visible), order[:, : layout.num_decoded], thrown)
    order = np.argsort(noise[:, 0], axis=1, kind="stable").astype(np.int32)
    visible, masked = order[:, : layout.num_visible], order[:, layout.num_visible :]
    if name == "random":
        return TokenIds(visible, masked, np.zeros((noise.shape[0], 0), np.int32))
    if layout.decodes_visible:
        skipped = running_cell_patterns(layout.grid, layout.throw_ratio)[_cell_pointers(noise)]  # [B, N]
        batch = noise.shape[0]
        kept_ids, skipped_ids = (np.nonzero(s)[1].reshape(batch, -1).astype(np.int32) for s in (~skipped, skipped))
        return TokenIds(visible, kept_ids, skipped_ids)
    if name in ("random_throw", "running_cell"):
        return TokenIds(visible, *_throw_first(masked, _throw_scores(name, noise, layout), layout.num_thrown))
    decoded = _furthest_points(visible, noise[:, 1], layout.grid, layout.num_decoded, seeded=name == "furthest_seeded")
    return TokenIds(visible, decoded, _remaining(layout.num_tokens, visible, decoded))


def _throw_scores(name: str, noise: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """``[B, N] float64``: masked tokens are thrown in ascending score. ``random_throw``: ``noise[:, 1]``.
    ``running_cell``: 0 plus a random tie-break where the image's cell skips the position, 1 plus it where
    the cell keeps it (the module docstring)."""
    if name == "random_throw":
        return noise[:, 1].astype(np.float64)
    scaled = 4.0 * noise[:, 1].astype(np.float64)
    skipped = running_cell_patterns(layout.grid, layout.throw_ratio)[_cell_pointers(noise)]
    return np.where(skipped, 0.0, 1.0) + (scaled - np.floor(scaled))


def _cell_pointers(noise: np.ndarray) -> np.ndarray:
    """``[B] int64`` in 0..3: each image's running-cell pointer ``floor(4 u)``, ``u = noise[:, 1, 0]``."""
    return np.minimum(np.floor(4.0 * noise[:, 1, 0].astype(np.float64)).astype(np.int64), 3)


def _throw_first(masked: np.ndarray, scores: np.ndarray, num_thrown: int) -> tuple[np.ndarray, np.ndarray]:
    """``(decoded, thrown)`` of ``masked [B, M]``: the ``num_thrown`` with the lowest ``scores [B, N]`` are
    thrown (ascending id), the others decoded (ascending score)."""
    throw_order = np.argsort(np.take_along_axis(scores, masked, axis=1), axis=1, kind="stable")
    shuffled = np.take_along_axis(masked, throw_order, axis=1)
    return shuffled[:, num_thrown:], np.sort(shuffled[:, :num_thrown], axis=1)


@functools.cache
def running_cell_patterns(grid: tuple[int, int], throw_ratio: float) -> np.ndarray:
    """VideoMAE V2's running cell on ``grid``: ``[4, N] bool``, row ``p`` True where the cell read from
    pointer ``p`` skips the position (the module docstring; token ids row-major).

    The cell holds ``k = round(4 * throw_ratio)`` skipped positions then ``4 - k`` kept ones; pointer ``p``
    reads it as ``cell[(arange(4) + p) % 4]`` reshaped row-major to 2x2, tiled over the grid and cut at
    odd borders.
    """
    skipped = round(4 * throw_ratio)
    cell = np.array([True] * skipped + [False] * (4 - skipped))
    rows, cols = (grid[0] + 1) // 2, (grid[1] + 1) // 2
    patterns = [
        np.tile(cell[(np.arange(4) + p) % 4].reshape(2, 2), (rows, cols))[: grid[0], : grid[1]] for p in range(4)
    ]
    table = np.stack(patterns).reshape(4, -1)
    table.flags.writeable = False
    return table


def multinomial_order(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The order of drawing every item without replacement, each draw proportional to the weights left
    (``torch.multinomial(weights, M)``, AMT's draw): ``[B, M] int32``, first drawn first.

    ``weights [B, M] >= 0``; ``uniforms [B, M]`` in [0, 1), one per item. Item ``i``'s key is
    ``-log(u_i) / w_i`` (an exponential clock of rate ``w_i``; the smallest key is drawn first with
    probability ``w_i / sum(w)``, and by memorylessness each later draw too). Zero weights are drawn last,
    among themselves by ``-log(u_i)``, as if uniform (where torch refuses to draw them).
    """
    weights = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(weights)) or (weights < 0).any():
        raise ValueError("multinomial weights must be finite and >= 0.")
    with np.errstate(divide="ignore"):
        clocks = -np.log(np.asarray(uniforms, np.float64))
        keys = clocks / weights
    return np.lexsort((clocks, keys), axis=-1).astype(np.int32)


def _uniform_if_none(weights: np.ndarray | None, noise: np.ndarray) -> np.ndarray:
    return np.ones(noise.shape[::2], np.float64) if weights is None else weights


def _sample_units(name: str, noise: np.ndarray, layout: TokenLayout, weights: np.ndarray | None = None) -> TokenIds:
    """``sample`` for SimMIM's unit masks: ``noise [B, 2, N]`` -> ``TokenIds`` in token ids.

    The ``U`` units are numbered row-major over ``layout.unit_grid``; unit
    ``k``'s tokens are listed row-major inside it. ``noise[:, 0, :U]`` ranks
    the units (smallest noise visible, as MAE's tokens); ``noise[:, 1]``
    breaks ties or picks the random throws, over the masked tokens
    (``throw_granularity='token'``) or over the units (``'unit'``, first ``U``
    entries). ``visible`` lists its units in ascending noise; ``decoded``
    lists its tokens (or units) in pick order for the furthest samplers;
    ``thrown`` is in ascending token id.

    ``amt`` (SimMIM-AMT's ``maskgenerate``) draws the units by their summed
    token weights with ``noise[:, 0, :U]``: the last drawn are visible; the
    masked tokens are then drawn by their own weights with ``noise[:, 1]``
    (``'token'``: the first ``N_dec`` decoded) or the masked units in their
    draw order (``'unit'``: the first decoded, the rest thrown).
    """
    batch = noise.shape[0]
    unit_tokens = _unit_tokens(layout.grid, layout.mask_unit)  # [U, u * u]
    units_visible = layout.num_visible // layout.tokens_per_unit
    units_masked = layout.num_units - units_visible
    if name == "amt":
        weights = _uniform_if_none(weights, noise)
        unit_draw = multinomial_order(weights[:, unit_tokens].sum(-1), noise[:, 0, : layout.num_units])
        unit_order = np.concatenate([unit_draw[:, units_masked:][:, ::-1], unit_draw[:, :units_masked]], axis=1)
    else:
        unit_order = np.argsort(noise[:, 0, : layout.num_units], axis=1, kind="stable").astype(np.int32)
    visible = unit_tokens[unit_order[:, :units_visible]].reshape(batch, -1)
    masked_units = unit_order[:, units_visible:]
    masked = unit_tokens[masked_units].reshape(batch, -1)
    if name == "random":
        return TokenIds(visible, masked, np.zeros((batch, 0), np.int32))
    seeded = name == "furthest_seeded"
    if layout.throw_granularity == "token":
        if name in ("random_throw", "running_cell"):
            return TokenIds(visible, *_throw_first(masked, _throw_scores(name, noise, layout), layout.num_thrown))
        if name == "amt":
            rows = np.arange(batch)[:, None]
            draw = multinomial_order(weights[rows, masked], noise[rows, 1, masked])
            drawn = np.take_along_axis(masked, draw, axis=1)
            return TokenIds(visible, drawn[:, : layout.num_decoded], np.sort(drawn[:, layout.num_decoded :], axis=1))
        decoded = _furthest_points(visible, noise[:, 1], layout.grid, layout.num_decoded, seeded)
        return TokenIds(visible, decoded, _remaining(layout.num_tokens, visible, decoded))
    units_decoded = layout.num_decoded // layout.tokens_per_unit
    if name == "amt":
        decoded_units = masked_units[:, :units_decoded]
    elif name == "random_throw":
        unit_noise = np.take_along_axis(noise[:, 1, : layout.num_units], masked_units, axis=1)
        shuffled = np.take_along_axis(masked_units, np.argsort(unit_noise, axis=1, kind="stable"), axis=1)
        decoded_units = shuffled[:, shuffled.shape[1] - units_decoded :]
    else:
        tie = noise[:, 1, : layout.num_units]
        decoded_units = _furthest_points(unit_order[:, :units_visible], tie, layout.unit_grid, units_decoded, seeded)
    decoded = unit_tokens[decoded_units].reshape(batch, -1)
    return TokenIds(visible, decoded, _remaining(layout.num_tokens, visible, decoded))


@functools.cache
def _unit_tokens(grid: tuple[int, int], unit: int) -> np.ndarray:
    """``[U, unit * unit] int32``: the token ids of every unit, units and tokens row-major."""
    rows, cols = grid[0] // unit, grid[1] // unit
    ids = np.arange(grid[0] * grid[1], dtype=np.int32).reshape(rows, unit, cols, unit)
    table = ids.transpose(0, 2, 1, 3).reshape(rows * cols, unit * unit)
    table.flags.writeable = False
    return table


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


def _furthest_points(visible, tie_noise, grid: tuple[int, int], num_picks: int, seeded: bool) -> np.ndarray:
    """Greedy furthest-point sampling of ``num_picks`` points of ``grid`` outside ``visible``: ``[B, num_picks]``.

    ``visible [B, V]`` and the result are ids on ``grid`` (tokens, or SimMIM's
    units); the picks are in pick order.

    ``score[b, n]`` is token n's squared distance to the nearest retained token
    plus its tie-break noise in [0, 1); squared grid distances are integers, so
    the noise only orders tokens at equal distance. Visible tokens score -inf
    (never picked); retained tokens score below 1 (distance 0) and every
    unretained masked token at least 1, so nothing is picked twice.
    """
    batch = visible.shape[0]
    distances = _squared_distances(tuple(grid))
    rows = np.arange(batch)[:, None]
    tie = tie_noise.astype(np.float32)
    # Farther than any two tokens, and finite so the tie-break noise still counts.
    beyond_grid = float(2 * (grid[0] ** 2 + grid[1] ** 2))
    score = np.full((batch, grid[0] * grid[1]), beyond_grid, np.float32)
    if seeded:
        for v in range(visible.shape[1]):
            np.minimum(score, distances[visible[:, v]], out=score)
    score += tie
    score[rows, visible] = -np.inf
    picks = np.empty((batch, num_picks), np.int32)
    for k in range(num_picks):
        pick = np.argmax(score, axis=1)
        picks[:, k] = pick
        np.minimum(score, distances[pick] + tie, out=score)
    return picks


def _remaining(num_tokens: int, visible: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """The ids in neither set, ascending: ``[B, N - N_vis - N_dec] int32``."""
    batch = visible.shape[0]
    taken = np.zeros((batch, num_tokens), bool)
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
    """Raises ``ValueError`` unless ``ids`` has the layout's shapes and partitions every grid (with
    ``layout.decodes_visible``: decoded and thrown partition it, and the visible ids are distinct)."""
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
    every = np.sort(np.concatenate((ids.decoded, ids.thrown) if layout.decodes_visible else ids, axis=1), axis=1)
    if not np.array_equal(every, np.broadcast_to(np.arange(layout.num_tokens), every.shape)):
        sets = "decoded and thrown" if layout.decodes_visible else "visible, decoded and thrown"
        raise ValueError(f"{sets} ids must partition range(N) for every image.")
    visible = np.sort(ids.visible, axis=1)
    out_of_grid = visible.size and (visible[:, 0].min() < 0 or visible[:, -1].max() >= layout.num_tokens)
    if layout.decodes_visible and (out_of_grid or (visible[:, 1:] == visible[:, :-1]).any()):
        raise ValueError("visible ids must be distinct tokens of range(N) for every image.")
