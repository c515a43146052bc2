"""Swin Transformer (Liu et al., ICCV 2021; microsoft/Swin-Transformer), the backbone of GreenMIM.

A Swin computes what the official ``SwinTransformer`` computes (tested against
transformers' ``SwinModel`` in ``tests/test_swin_equivalence.py``):

- ``patch_embed``: ``p x p`` patches (``p = 4``) -> width ``C``, then LayerNorm ``patch_norm``;
- stages ``s = 0..S-1`` of ``depths[s]`` blocks at width ``C * 2^s`` on a token grid
  ``(H / p / 2^s, W / p / 2^s)``; every block is pre-norm window attention + MLP (ratio 4).
  Block ``j`` of a stage attends within ``w x w`` windows (``w = 7``), shifted
  cyclically by ``w // 2`` when ``j`` is odd, with the attention mask that keeps
  tokens brought together by the cyclic shift apart (``shifted_window_mask``).
  Where a stage's grid is no larger than the window (``min(grid) <= w``) the
  window is clipped to ``min(grid)`` and no block shifts (``stage_window``), as
  the official code does;
- each attention adds a relative position bias, one table
  ``relative_position_bias_table [(2w - 1)^2, heads]`` per block indexed by the
  row / column offset of every query-key pair in a window (``relative_position_index``);
- ``downsample`` after every stage but the last (patch merging): each 2x2 block of
  tokens concatenated in the official order ``(0,0), (1,0), (0,1), (1,1)`` (row, column)
  -> LayerNorm over ``4C`` -> linear ``4C -> 2C`` without bias;
- the final LayerNorm ``norm``, the mean over tokens, and an optional linear ``head``.

Stochastic depth grows linearly over all blocks of all stages, ``rate * k / (K - 1)``
for block ``k`` of ``K``. LayerNorms use PyTorch's eps 1e-5 (the official Swin's).
Official Swin does not pad: every stage's grid must tile into its windows and
(before merging) be even; an image size that does not is a ``ValueError`` naming the
stage and the nearest sizes that work (``stage_layouts``). Non-square images work
wherever the official code works (each side tiles).

Initialisation is the official one: linears (q, k, v, out, MLP, merging, head) and the
relative position tables normal(0.02) (timm's ``trunc_normal_(std=.02)`` cuts at +-2,
a hundred standard deviations), zero biases, LayerNorm 1 / 0, and PyTorch's Conv2d
default for the patch embedding (weight and bias U(+-1/sqrt(p*p*C))).

Logical axes are the ViT's (``prmim_jax.models.vit``): ``embed`` (width; the merging's
``4C`` input side), ``mlp``, ``heads``, ``kv``, ``patch``, ``classes``; activations are
``('batch', 'tokens', 'embed')`` in the blocks, with the windows of a batch folded into
``batch`` inside attention. The precision policy (``dtype``), ``attention_impl`` and
``remat`` are the ViT's (float32 residual stream, float32 softmax, float32 pooled
features and head; cuDNN only where a window has an even number of tokens, since its
kernel needs even lengths with a bias; blocks rematerialised as ``vit.remat_block``).

Pieces a masked (GreenMIM) encoder reuses, each independent of the dense image grid:

- ``relative_position_index(window)`` and ``relative_position_index_between(q_coords,
  k_coords, window)``: table rows for any token pairs given their in-window coordinates;
- ``WindowAttention(x [B, G, N, D], mask, relative_index)``: attention within each of ``G``
  groups of ``N`` tokens, with the block's relative position table and an optional
  additive mask (``[G, N, N]`` shared by the batch or ``[B, G, N, N]``);
- ``SwinBlock(x [B, T, D], windows, deterministic)``: one block whose grouping of tokens
  into windows is the ``windows`` argument (``ShiftedWindows`` for a dense grid; any
  object with ``partition`` / ``merge`` / ``attention_mask`` / ``relative_index``);
- ``PatchMerging(x [..., 2h, 2w, C]) -> [..., h, w, 2C]`` over any batch of 2-D blocks;
- submodule names ``stage_{s}/block_{j}``, ``stage_{s}/downsample`` that the
  checkpoint tools (``prmim_jax.interop.swin_checkpoint``) and layer-wise lr decay
  (``layer_id``) read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from prmim_jax.models import attention as attention_lib
from prmim_jax.models import features as features_lib
from prmim_jax.models import layers, vit

LAYER_NORM_EPS = 1e-5  # PyTorch's nn.LayerNorm default, the official Swin's
MASK_VALUE = -100.0  # the official shifted-window mask between tokens of different regions
INIT_STD = 0.02

# name -> (width C, blocks per stage, heads per stage): the Swin paper's T / S / B / L.
SWIN_SIZES = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


@dataclasses.dataclass(frozen=True)
class SwinSize:
    width: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]


def parse_variant(variant: str) -> SwinSize:
    """``'B'`` -> ``SwinSize(128, (2, 2, 18, 2), (4, 8, 16, 32))``; one of ``SWIN_SIZES``."""
    if variant not in SWIN_SIZES:
        raise ValueError(f"unknown Swin variant {variant!r}; expected one of {sorted(SWIN_SIZES)}.")
    width, depths, heads = SWIN_SIZES[variant]
    return SwinSize(width, depths, heads)


def swin_size(config: ml_collections.ConfigDict) -> SwinSize:
    """The size of a ``model_config``: ``variant`` with any ``width`` / ``depths`` / ``num_heads`` override;
    ``ValueError`` (with the fix) when stages and heads disagree or a width does not split into heads."""
    size = parse_variant(config.variant)
    width = config.get("width") or size.width
    depths = tuple(config.get("depths") or size.depths)
    num_heads = tuple(config.get("num_heads") or size.num_heads)
    if len(depths) != len(num_heads) or not depths:
        raise ValueError(
            f"depths={depths} and num_heads={num_heads} must name the same (non-zero) number of stages; "
            "set --config.model.depths and --config.model.num_heads to tuples of one length."
        )
    for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        if depth < 1 or heads < 1:
            raise ValueError(f"stage {stage} has {depth} blocks and {heads} heads; both must be at least 1.")
        if (width * 2**stage) % heads:
            raise ValueError(
                f"stage {stage}'s width {width * 2**stage} (width={width} x 2^{stage}) does not split into "
                f"{heads} heads; change width or num_heads."
            )
    return SwinSize(width, depths, num_heads)


# --- geometry ---------------------------------------------------------------------------------------


def stage_window(grid: tuple[int, int], window_size: int) -> tuple[int, int]:
    """``(window, shift of odd blocks)`` on a ``grid`` of tokens: ``(w, w // 2)``, or ``(min(grid), 0)`` where the
    grid is no larger than the window (the official rule: one window, nothing to shift)."""
    if min(grid) <= window_size:
        return min(grid), 0
    return window_size, window_size // 2


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """One stage: its token ``grid (rows, cols)``, ``width``, ``depth``, ``num_heads``, the attention ``window``
    (clipped, ``stage_window``), the ``shift`` of its odd blocks, and ``first_block``, the index of its first
    block over all stages (drop path and layer-wise lr decay count blocks across stages)."""

    grid: tuple[int, int]
    width: int
    depth: int
    num_heads: int
    window: int
    shift: int
    first_block: int


def geometry_problem(image_size: tuple[int, int], patch_size: int, window_size: int, num_stages: int) -> str | None:
    """Why ``image_size (h, w)`` cannot run through ``num_stages`` stages unpadded, as a phrase; None when it can."""
    height, width = image_size
    if height % patch_size or width % patch_size:
        return f"image_size {height}x{width} is not a multiple of patch_size {patch_size}"
    grid = (height // patch_size, width // patch_size)
    for stage in range(num_stages):
        window, _ = stage_window(grid, window_size)
        if grid[0] % window or grid[1] % window:
            return f"stage {stage}'s {grid[0]}x{grid[1]} token grid does not tile into {window}x{window} windows"
        if stage < num_stages - 1:
            if grid[0] % 2 or grid[1] % 2:
                return f"stage {stage}'s {grid[0]}x{grid[1]} token grid cannot be merged 2x2 for stage {stage + 1}"
            grid = (grid[0] // 2, grid[1] // 2)
    return None


def nearest_image_sizes(size: int, patch_size: int, window_size: int, num_stages: int) -> list[int]:
    """The square image sizes closest to ``size`` (at most one below, one above) that need no padding."""
    fits = functools.partial(geometry_problem, patch_size=patch_size, window_size=window_size, num_stages=num_stages)
    below = next((s for s in range(size - 1, 0, -1) if fits((s, s)) is None), None)
    period = patch_size * window_size * 2 ** (num_stages - 1)  # its multiples always fit
    above = next((s for s in range(size + 1, size + period + 1) if fits((s, s)) is None), None)
    return [s for s in (below, above) if s is not None]


def stage_layouts(
    image_size: tuple[int, int],
    patch_size: int,
    width: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window_size: int,
) -> tuple[StageLayout, ...]:
    """Every stage's ``StageLayout``; ``ValueError`` naming the stage and the fix when the image does not tile.

    Stage ``s`` has grid ``(h / p / 2^s, w / p / 2^s)`` and width ``width * 2^s``.
    Official Swin (classification) does not pad, and neither do we: an image
    whose grids do not tile into windows, or cannot be merged, is refused with
    the nearest square image sizes that work.
    """
    problem = geometry_problem(tuple(image_size), patch_size, window_size, len(depths))
    if problem:
        sizes = nearest_image_sizes(max(image_size), patch_size, window_size, len(depths))
        raise ValueError(
            f"{problem}; Swin does not pad (as the official Swin), so every stage's token grid must tile into "
            f"its windows: use image_size {' or '.join(map(str, sizes))} (patch {patch_size}, window "
            f"{window_size}, {len(depths)} stages), or change window_size or patch_size."
        )
    grid = (image_size[0] // patch_size, image_size[1] // patch_size)
    layouts, first = [], 0
    for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        window, shift = stage_window(grid, window_size)
        layouts.append(StageLayout(grid, width * 2**stage, depth, heads, window, shift, first))
        grid, first = (grid[0] // 2, grid[1] // 2), first + depth
    return tuple(layouts)


# --- windows ----------------------------------------------------------------------------------------


def relative_position_index_between(
    query_coords: np.ndarray, key_coords: np.ndarray, window: tuple[int, int]
) -> np.ndarray:
    """``[Nq, Nk] int32``: the relative position table row of every (query, key) pair.

    ``query_coords [Nq, 2]``, ``key_coords [Nk, 2]``: ``(row, col)`` of tokens
    inside a ``window (wh, ww)``. A pair offset by ``(dr, dc) = query - key``
    reads row ``(dr + wh - 1) * (2 ww - 1) + dc + ww - 1`` of the
    ``[(2 wh - 1) (2 ww - 1), heads]`` table (the official indexing). Offsets
    beyond the window (pairs a caller masks out) are clipped into the table.
    """
    wh, ww = window
    offsets = np.asarray(query_coords)[:, None, :] - np.asarray(key_coords)[None, :, :]
    rows = np.clip(offsets[..., 0], 1 - wh, wh - 1) + wh - 1
    cols = np.clip(offsets[..., 1], 1 - ww, ww - 1) + ww - 1
    return (rows * (2 * ww - 1) + cols).astype(np.int32)


@functools.cache
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """``[wh * ww, wh * ww] int32``: the official ``relative_position_index`` of a window, tokens row-major."""
    coords = np.stack(np.divmod(np.arange(window[0] * window[1]), window[1]), axis=-1)
    index = relative_position_index_between(coords, coords, window)
    index.flags.writeable = False
    return index


def relative_position_table_size(window: tuple[int, int]) -> int:
    """Rows of a window's relative position table: every 2-D offset, ``(2 wh - 1) (2 ww - 1)``."""
    return (2 * window[0] - 1) * (2 * window[1] - 1)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """``[B, H, W, D] -> [B, (H / w) (W / w), w * w, D]``: windows row-major, tokens row-major in each."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, (height // window) * (width // window), window * window, channels)


def window_merge(windows: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Inverse of ``window_partition``: ``[B, nW, w * w, D] -> [B, H, W, D]`` for ``grid = (H, W)``."""
    batch, _, area, channels = windows.shape
    window = math.isqrt(area)
    x = windows.reshape(batch, grid[0] // window, grid[1] // window, window, window, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, grid[0], grid[1], channels)


@functools.cache
def shifted_window_mask(grid: tuple[int, int], window: int, shift: int) -> np.ndarray:
    """``[nW, w * w, w * w] float32``: 0 between tokens of one region, ``MASK_VALUE`` (-100) between regions.

    After the cyclic shift by ``-shift`` (rows and columns), each axis splits
    into three regions, ``[0, L - w)``, ``[L - w, L - shift)`` and ``[L - shift,
    L)``; the last windows of each axis gather tokens of different regions that
    were not neighbours before the shift, and they must not attend to each
    other. Windows in ``window_partition`` order. The official ``attn_mask`` buffer.
    """

    def regions(length):
        labels = np.zeros(length, np.int64)
        labels[length - window :] = 1
        labels[length - shift :] = 2
        return labels

    labels = regions(grid[0])[:, None] * 3 + regions(grid[1])[None, :]  # [H, W], on the shifted grid
    rows, cols = grid[0] // window, grid[1] // window
    windows = labels.reshape(rows, window, cols, window).transpose(0, 2, 1, 3).reshape(rows * cols, -1)  # [nW, w * w]
    mask = np.where(windows[:, :, None] == windows[:, None, :], 0.0, MASK_VALUE).astype(np.float32)
    mask.flags.writeable = False
    return mask


@flax.struct.dataclass
class ShiftedWindows:
    """How a dense Swin block groups the tokens of a ``grid`` into windows (cyclically shifted by ``shift``).

    The grouping protocol ``SwinBlock`` reads (a masked encoder writes its own):
    ``partition(tokens [B, T, D]) -> [B, G, N, D]``, ``merge`` its inverse,
    ``attention_mask() -> [G, N, N] | [B, G, N, N] | None`` (additive logits) and
    ``relative_index() -> [..., N, N] int32 | None`` (None: the window's own
    ``relative_position_index``). Here ``T = rows * cols`` row-major, ``G`` the
    windows and ``N = window^2``. A pytree without leaves, so it passes through
    ``nn.remat`` as an argument.
    """

    grid: tuple[int, int] = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)
    shift: int = flax.struct.field(pytree_node=False, default=0)

    def partition(self, tokens: jax.Array) -> jax.Array:
        x = tokens.reshape(tokens.shape[0], *self.grid, tokens.shape[-1])
        if self.shift:
            x = jnp.roll(x, (-self.shift, -self.shift), axis=(1, 2))
        return window_partition(x, self.window)

    def merge(self, windows: jax.Array) -> jax.Array:
        x = window_merge(windows, self.grid)
        if self.shift:
            x = jnp.roll(x, (self.shift, self.shift), axis=(1, 2))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def attention_mask(self) -> np.ndarray | None:
        return shifted_window_mask(tuple(self.grid), self.window, self.shift) if self.shift else None

    def relative_index(self) -> None:
        return None


# --- modules ----------------------------------------------------------------------------------------


def _normal_init() -> nn.initializers.Initializer:
    return nn.initializers.normal(INIT_STD)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return layers.layer_norm(dtype, name, epsilon=LAYER_NORM_EPS)


class WindowAttention(attention_lib.Attention):
    """Multi-head attention within groups of tokens, with a relative position bias: ``[B, G, N, D] -> [B, G, N, D]``.

    ``attention.Attention`` (q, k, v, out kernels ``[D, heads, kv]`` / ``[heads, kv,
    D]``, scale ``1 / sqrt(kv)``, float32 softmax, ``attention_impl``) applied to
    each of the ``G`` groups (windows) of ``N`` tokens, with the additive logits
    ``table[index] + mask``: ``relative_position_bias_table [(2 wh - 1)(2 ww - 1),
    heads]`` (a parameter), ``index`` the window's ``relative_position_index`` or
    ``relative_index`` (int32, ``[N, N]``, ``[G, N, N]`` or ``[B, G, N, N]``), and
    ``mask`` (``[G, N, N]`` or ``[B, G, N, N]`` additive logits, or None).
    """

    window_size: tuple[int, int] = (7, 7)

    @nn.compact
    def __call__(self, x, mask=None, relative_index=None):
        batch, groups, tokens, width = x.shape
        table = self.param(
            "relative_position_bias_table",
            layers.logical(_normal_init(), None, "heads"),
            (relative_position_table_size(self.window_size), self.num_heads),
        )
        index = relative_position_index(tuple(self.window_size)) if relative_index is None else relative_index
        bias = jnp.moveaxis(table[jnp.asarray(index)], -1, -3)  # [..., heads, N, N] float32
        if mask is not None:
            bias = bias + jnp.expand_dims(jnp.asarray(mask, jnp.float32), -3)
        bias = jnp.broadcast_to(bias, (batch, groups, self.num_heads, tokens, tokens))
        out = super().__call__(
            x.reshape(batch * groups, tokens, width), bias.reshape(batch * groups, self.num_heads, tokens, tokens)
        )
        return out.reshape(batch, groups, tokens, width)


class SwinBlock(nn.Module):
    """A Swin block, ``[B, T, D] -> [B, T, D]``: ``x + attn(norm1(x))`` in windows, then ``x + mlp(norm2(x))``.

    ``windows`` groups the ``T`` tokens for attention (``ShiftedWindows`` for a
    dense grid, the protocol in its docstring); ``window_size`` is the window
    side the relative position table covers. ``drop_path`` drops each branch
    for a whole example (stochastic depth, needs the ``'dropout'`` rng unless
    ``deterministic``).
    """

    num_heads: int
    window_size: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, windows, deterministic: bool = True):
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=deterministic or not self.drop_path)
        attention = WindowAttention(
            self.num_heads,
            self.dtype,
            self.attention_impl,
            kernel_init=_normal_init(),
            window_size=(self.window_size, self.window_size),
            name="attn",
        )
        grouped = windows.partition(_layer_norm(self.dtype, "norm1")(x))
        attended = attention(grouped, windows.attention_mask(), windows.relative_index())
        x = x + drop(windows.merge(attended))
        mlp = layers.MlpBlock(self.mlp_dim, self.dtype, kernel_init=_normal_init(), name="mlp")
        x = x + drop(mlp(_layer_norm(self.dtype, "norm2")(x)))
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


# ``deterministic`` (argument 3, counting the module as 0) decides drop path at trace time.
_REMAT_BLOCKS = {
    "none": SwinBlock,
    "dots_saveable": nn.remat(SwinBlock, static_argnums=(3,), policy=jax.checkpoint_policies.dots_saveable),
    "full": nn.remat(SwinBlock, static_argnums=(3,), policy=jax.checkpoint_policies.nothing_saveable),
}


class PatchMerging(nn.Module):
    """Patch merging: ``[..., 2h, 2w, C] -> [..., h, w, 2C]``, each 2x2 block of tokens becoming one.

    The four tokens ``(0,0), (1,0), (0,1), (1,1)`` (row, column offsets: the
    official concatenation order) -> ``[4C]`` -> LayerNorm ``norm`` ->
    ``reduction`` (``[4C, 2C]``, no bias). Works on any leading axes, so a
    masked encoder can merge its visible blocks.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        parts = [x[..., row::2, col::2, :] for col in (0, 1) for row in (0, 1)]
        merged = _layer_norm(self.dtype, "norm")(jnp.concatenate(parts, axis=-1))
        return layers.FlatDense(
            2 * channels,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=layers.logical(_normal_init(), "embed", None),
            name="reduction",
        )(merged)


class SwinStage(nn.Module):
    """The blocks of one stage (``layout``), then patch merging when ``downsample``.

    ``[B, rows * cols, width] -> [B, rows * cols, width]``, or ``[B, rows * cols / 4,
    2 width]`` with ``downsample``; tokens row-major on ``layout.grid``. Block ``j``
    uses ``ShiftedWindows(grid, window, shift if j is odd else 0)`` and drops its
    branches with ``drop_path_rates[j]``. The residual stream is
    ``layers.residual_dtype(dtype)`` (float32 under bfloat16).
    """

    layout: StageLayout
    mlp_ratio: float = 4.0
    drop_path_rates: tuple[float, ...] = ()
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x, deterministic: bool = True, *, windows_of=None, blocks_shape=None):
        """``windows_of(shift)``: the grouping of block ``j`` (shift ``layout.shift`` when ``j`` is odd, else 0);
        default ``ShiftedWindows`` on ``layout.grid``. ``blocks_shape``: how the tokens ``[B, T, width]`` read as
        ``[B, *blocks_shape, width]`` with the 2x2 blocks to merge on the last two axes; default ``layout.grid``
        (a masked encoder passes ``(units, s, s)``)."""
        layout = self.layout
        if self.remat not in _REMAT_BLOCKS:
            raise ValueError(f"remat={self.remat!r}; choose one of {vit.REMAT_POLICIES}.")
        if windows_of is None:
            windows_of = functools.partial(ShiftedWindows, layout.grid, layout.window)
        block_class = _REMAT_BLOCKS[self.remat]
        for j in range(layout.depth):
            windows = windows_of(layout.shift if j % 2 else 0)
            block = block_class(
                layout.num_heads,
                layout.window,
                int(layout.width * self.mlp_ratio),
                self.dtype,
                self.attention_impl,
                self.drop_path_rates[j] if self.drop_path_rates else 0.0,
                name=f"block_{j}",
            )
            x = vit.residual_boundary(block(x, windows, deterministic))
        if self.downsample:
            grid = x.reshape(x.shape[0], *(blocks_shape or layout.grid), x.shape[-1])
            merged = PatchMerging(self.dtype, name="downsample")(grid)
            x = merged.reshape(x.shape[0], -1, merged.shape[-1]).astype(x.dtype)
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


class SwinOutput(NamedTuple):
    features: jax.Array  # [B, h, w, D_last] after the final LayerNorm, h = H / p / 2^(S-1); dtype ``dtype``
    pooled: jax.Array  # [B, D_last] float32: the mean of ``features`` over the grid
    logits: jax.Array | None  # [B, num_classes] float32 with a head, else None


class SwinTransformer(nn.Module):
    """The Swin Transformer of the module docstring: ``images [B, H, W, C] -> SwinOutput``.

    ``features [B, H / 32, W / 32, 8 width]`` at patch 4 with four stages (in
    general ``H / (p 2^(S-1))`` and ``width 2^(S-1)``), ``pooled [B, 8 width]``
    float32, and ``logits [B, num_classes]`` float32 when ``num_classes > 0``.
    ``images`` are float, normalised. Block ``k`` of all ``K`` drops its branches
    with ``drop_path_rate * k / (K - 1)`` when not ``deterministic``.
    """

    image_size: tuple[int, int]
    patch_size: int = 4
    channels: int = 3
    width: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    num_classes: int = 0
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @property
    def stages(self) -> tuple[StageLayout, ...]:
        return stage_layouts(
            tuple(self.image_size), self.patch_size, self.width, self.depths, self.num_heads, self.window_size
        )

    @property
    def depth(self) -> int:
        """Blocks over all stages (layer-wise lr decay numbers them 1..depth)."""
        return sum(self.depths)

    @property
    def num_features(self) -> int:
        """The last stage's width, ``width * 2^(S-1)``."""
        return self.width * 2 ** (len(self.depths) - 1)

    tokens_normalized = True  # ``features``' tokens come out of the final LayerNorm (``models.features``)

    @property
    def architecture(self) -> dict:
        """What a pretrained encoder must share with this one for its parameters to load into it (the window may
        differ: ``adapt_pretrained`` resizes the relative position tables)."""
        return dict(
            family="swin",
            width=self.width,
            depths=tuple(self.depths),
            num_heads=tuple(self.num_heads),
            mlp_ratio=self.mlp_ratio,
            patch_size=self.patch_size,
        )

    def features(self, images, deterministic: bool = True) -> features_lib.EncoderOutput:
        """``images [B, H, W, C]`` -> ``EncoderOutput``: the last stage's tokens after the final norm, no cls token,
        pooled as the official Swin pools (the mean after the final norm)."""
        output = self(images, deterministic)
        tokens = output.features.reshape(output.features.shape[0], -1, output.features.shape[-1])
        return features_lib.EncoderOutput(tokens, None, output.pooled)

    def layer_id(self, names: list[str]) -> int:
        """The layer of the parameter at ``names`` (its path in this Swin) for layer-wise lr decay (``layer_id``)."""
        return layer_id(names, tuple(self.depths))

    def resized(self, image_size: int) -> SwinTransformer:
        """This Swin for square images of ``image_size`` (``adapt_pretrained`` resizes the relative tables to its
        windows); ``ValueError`` naming the sizes that work when its stages do not tile it."""
        problem = geometry_problem((image_size, image_size), self.patch_size, self.window_size, len(self.depths))
        if problem:
            raise ValueError(f"{image_size}: {problem}")
        return self.clone(image_size=(image_size, image_size))

    def adapt_pretrained(self, params: dict, pretrained: SwinTransformer) -> dict:
        """The parameters ``params`` of the ``pretrained`` Swin as host numpy arrays for this one: the relative
        position tables resized to this model's windows (``resize_relative_position_tables``)."""
        del pretrained  # the tables carry their own window
        return resize_relative_position_tables(jax.tree.map(np.asarray, params), self)

    @nn.compact
    def __call__(self, images, deterministic: bool = True) -> SwinOutput:
        if tuple(images.shape[1:]) != (*self.image_size, self.channels):
            raise ValueError(
                f"images are {images.shape[1:]}; the model was built for {(*self.image_size, self.channels)}."
            )
        stages = self.stages
        x = embed_patches(vit.patchify(images, self.patch_size), self.width, self.dtype)
        for stage in stage_modules(self):
            x = stage(x, deterministic)
        x = final_norm(x, self.dtype)
        pooled = jnp.mean(x.astype(jnp.float32), axis=1)
        logits = None
        if self.num_classes:
            logits = nn.Dense(
                self.num_classes,
                kernel_init=layers.logical(_normal_init(), "embed", "classes"),
                bias_init=layers.logical(nn.initializers.zeros, "classes"),
                name="head",
            )(pooled)
        return SwinOutput(x.reshape(x.shape[0], *stages[-1].grid, x.shape[-1]), pooled, logits)


def stage_modules(model: SwinTransformer) -> list[SwinStage]:
    """``model``'s stages ``stage_<s>``, made in the calling (compact) method: each with its blocks' share of the
    linear drop-path schedule over all blocks, and a patch merging after every stage but the last."""
    stages = model.stages
    rates = drop_path_rates(model.drop_path_rate, model.depth)
    return [
        SwinStage(
            layout,
            model.mlp_ratio,
            rates[layout.first_block : layout.first_block + layout.depth],
            downsample=s < len(stages) - 1,
            dtype=model.dtype,
            attention_impl=model.attention_impl,
            remat=model.remat,
            name=f"stage_{s}",
        )
        for s, layout in enumerate(stages)
    ]


def embed_patches(patches: jax.Array, width: int, dtype) -> jax.Array:
    """``patches [B, T, p * p * C]`` -> ``[B, T, width]`` in the residual dtype: the patch embedding
    ``patch_embed`` and its LayerNorm ``patch_norm``, created in the calling (compact) module.

    The official patch embedding is a Conv2d left at PyTorch's default init: U(+-1/sqrt(fan_in)).
    """
    bound = 1.0 / math.sqrt(patches.shape[-1])
    x = layers.FlatDense(
        width,
        dtype=dtype,
        kernel_init=layers.logical(layers.uniform_init(bound), "patch", "embed"),
        bias_init=layers.logical(layers.uniform_init(bound), "embed"),
        name="patch_embed",
    )(patches.astype(dtype))
    x = _layer_norm(dtype, "patch_norm")(x).astype(layers.residual_dtype(dtype))
    return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


def final_norm(x: jax.Array, dtype) -> jax.Array:
    """The last stage's LayerNorm ``norm``, created in the calling (compact) module: ``[..., D] -> [..., D]``."""
    return _layer_norm(dtype, "norm")(x)


def drop_path_rates(rate: float, num_blocks: int) -> tuple[float, ...]:
    """Stochastic depth of every block over all stages: ``rate * k / (K - 1)`` (official ``linspace(0, rate, K)``)."""
    return tuple(rate * k / max(num_blocks - 1, 1) for k in range(num_blocks))


# --- parameters -------------------------------------------------------------------------------------

_BLOCK = re.compile(r"block_(\d+)")
_STAGE = re.compile(r"stage_(\d+)")


def layer_id(names: list[str], depths: tuple[int, ...]) -> int:
    """A Swin parameter's layer for layer-wise lr decay (the official SimMIM / Swin fine-tuning rule).

    ``names``: the parameter's path inside ``SwinTransformer`` (``layers.path_names``).
    0 for the patch embedding and its norm; block ``j`` of stage ``s`` is
    ``sum(depths[:s]) + j + 1`` (blocks numbered across stages); a stage's
    ``downsample`` counts with that stage's last block, ``sum(depths[:s + 1])``;
    the final norm and the head are ``sum(depths) + 1``.
    """
    if names[0].startswith("patch_"):
        return 0
    stage = _STAGE.fullmatch(names[0])
    if stage is None:
        return sum(depths) + 1
    s = int(stage.group(1))
    if names[1] == "downsample":
        return sum(depths[: s + 1])
    return sum(depths[:s]) + int(_BLOCK.fullmatch(names[1]).group(1)) + 1


def resize_relative_position_table(table: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """``table [(2a - 1)(2b - 1), heads]`` of a square ``a x a`` window -> ``[(2 wh - 1)(2 ww - 1), heads]``.

    Each head's ``(2a - 1) x (2a - 1)`` grid of offsets is resized bicubically
    (SimMIM's and timm's rule when fine-tuning at another window than
    pretraining; jax's cubic kernel is Keys' a = -0.5 where PyTorch's is -0.75,
    so values differ slightly from theirs). A table of the right size is returned as it is.
    """
    table = np.asarray(table)
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"a relative position table of {table.shape[0]} rows is not a square window's.")
    new_shape = (2 * window[0] - 1, 2 * window[1] - 1)
    if (side, side) == new_shape:
        return table
    grid = jnp.asarray(table, jnp.float32).reshape(side, side, table.shape[-1])
    resized = jax.image.resize(grid, (*new_shape, table.shape[-1]), method="cubic", antialias=False)
    return np.asarray(resized).reshape(-1, table.shape[-1]).astype(table.dtype)


def resize_relative_position_tables(params: dict, model: SwinTransformer) -> dict:
    """``params`` (a ``SwinTransformer``'s, numpy or jax) with every block's table resized to ``model``'s windows
    (``resize_relative_position_table``); other leaves are returned as they are."""
    params = dict(params)
    for s, layout in enumerate(model.stages):
        stage = params.get(f"stage_{s}")
        if stage is None:
            continue
        stage = params[f"stage_{s}"] = dict(stage)
        for j in range(layout.depth):
            if f"block_{j}" not in stage:
                continue
            block = stage[f"block_{j}"] = dict(stage[f"block_{j}"])
            attn = block["attn"] = dict(block["attn"])
            attn["relative_position_bias_table"] = resize_relative_position_table(
                attn["relative_position_bias_table"], (layout.window, layout.window)
            )
    return params


# --- config -----------------------------------------------------------------------------------------


def model_config(variant: str = "B", **overrides) -> ml_collections.ConfigDict:
    """The model section of a Swin: ``variant`` (``T|S|B|L``, ``SWIN_SIZES``) and its overrides.

    Keys: ``width`` (C), ``depths`` and ``num_heads`` (tuples, one entry per
    stage; None: the variant's), ``patch_size`` (4), ``window_size`` (7),
    ``mlp_ratio``, ``image_size`` (int or ``(h, w)``), ``channels``,
    ``drop_path_rate``, ``dtype``, ``attention_impl``, ``remat`` (as the ViT's).
    """
    config = ml_collections.ConfigDict(
        dict(
            variant=variant,
            # None: the variant's. Typed placeholders, so --config.model.depths='(2,2)' etc. can override them.
            width=config_dict.placeholder(int),
            depths=config_dict.placeholder(tuple),
            num_heads=config_dict.placeholder(tuple),
            patch_size=4,
            window_size=7,
            mlp_ratio=4.0,
            image_size=overrides.pop("image_size", 224),  # an int, or an (h, w) pair from the start
            channels=3,
            drop_path_rate=0.1,
            dtype="float32",
            attention_impl=config_dict.placeholder(
                str
            ),  # None / 'auto', 'xla', 'cudnn' (models.attention.attention_implementation)
            remat="none",  # 'none', 'dots_saveable', 'full' (vit.remat_block)
        )
    )
    config.update(overrides)
    return config


def build_swin(config: ml_collections.ConfigDict, num_classes: int = 0) -> SwinTransformer:
    """A ``SwinTransformer`` from a ``model_config``-shaped config (and a head of ``num_classes``, 0: none).

    Raises ``ValueError`` naming the fix on sizes that do not fit (``swin_size``,
    ``stage_layouts``), a drop path rate outside [0, 1), an unknown dtype, or an
    ``attention_impl`` / ``remat`` that cannot run here.
    """
    size = swin_size(config)
    image_size = vit.as_pair(config.image_size)
    if config.window_size < 1 or config.patch_size < 1:
        raise ValueError(
            f"window_size={config.window_size} and patch_size={config.patch_size} must be positive integers."
        )
    if not 0.0 <= config.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={config.drop_path_rate} must lie in [0, 1).")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={config.dtype!r}: choose 'float32' or 'bfloat16' (params stay float32).")
    model = SwinTransformer(
        image_size=image_size,
        patch_size=config.patch_size,
        channels=config.channels,
        width=size.width,
        depths=size.depths,
        num_heads=size.num_heads,
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        num_classes=num_classes,
        drop_path_rate=config.drop_path_rate,
        dtype=jnp.dtype(config.dtype),
        attention_impl=config.get("attention_impl"),
        remat=config.get("remat", "none"),
    )
    check_attention(model)
    return model


def check_attention(model: SwinTransformer) -> None:
    """``ValueError`` (naming the fix) for a ``remat`` or ``attention_impl`` that cannot run, before compiling;
    cuDNN needs an even number of tokens per window (its kernel's rule with an additive bias)."""
    if model.remat not in vit.REMAT_POLICIES:
        raise ValueError(f"remat={model.remat!r}; choose one of {vit.REMAT_POLICIES}.")
    backend = jax.default_backend()
    capability = attention_lib.device_compute_capability() if model.attention_impl == "cudnn" else None
    for layout in model.stages:  # also checks the geometry
        attention_lib.attention_implementation(
            model.dtype,
            layout.width // layout.num_heads,
            backend,
            model.attention_impl,
            capability,
            odd_length_bias=layout.window % 2 == 1,
        )
