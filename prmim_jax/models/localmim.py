"""LocalMIM's model (Wang et al., CVPR 2023): multi-level decoders reading intermediate encoder blocks.

The encoder is MAE's (``vit.Encoder`` over the visible tokens). The outputs of
several of its blocks (ViT-B: blocks 2, 4, 10 and 12 counted from 1, the
official ``[1, 3, depth - 3, depth - 1]`` counted from 0) each go through their
own LayerNorm into a *level*: a one-block MAE decoder (width 256, 8 heads,
``models.mae.Decoder``: visible latents plus mask tokens at the decoded
positions), a LayerNorm, and a head that predicts HOG features on a grid of
``scale`` times the token grid's side:

=======  =========================================================  ============  =========
scale    head (official ``MAE_Decoder.pred``)                        grid at 224   HOG cell
=======  =========================================================  ============  =========
4        2x2 stride-2 transposed conv to C/2, LayerNorm, GELU,       56 x 56       4 px
         2x2 stride-2 transposed conv to C/4, 1x1 conv
2        2x2 stride-2 transposed conv to C/2, 1x1 conv               28 x 28       8 px
1        1x1 conv                                                    14 x 14       16 px
0.5      2x2 average pooling, 1x1 conv                               7 x 7         32 px
=======  =========================================================  ============  =========

The 1x1 convolution outputs ``channels * bins`` values per cell (27 for RGB),
the HOG cell is ``patch_size / scale`` pixels (``prmim_jax.targets.hog``).
The deepest level reads the last block, and its LayerNorm is the encoder's
final norm (``params['encoder']['transformer']['norm']``), which evaluation
and fine-tuning keep.

Where the thrown tokens go (partial reconstruction and PR-MIM). The heads
need a full grid of tokens, so each level scatters its tokens onto the token
grid after its LayerNorm and before its head:

- ``full``: the decoder sees the visible and every masked token: the grid is
  full (the official model).
- ``partial``: the decoder sees the visible and decoded tokens only; the
  thrown positions of the grid hold zeros (the paper's fill) and get no loss.
  The transposed convolutions and 1x1 convolutions act per token, so the
  zeros reach no other token's prediction at scales 4, 2, 1; at scale 0.5 a
  2x2 cell averages them with its other tokens.
- ``progressive`` (PR-MIM): each level has its own aggregator
  (``models.aggregate``, the 7x7 depth-wise convolution by default) over its
  decoder's outputs (before the LayerNorm, as MAE + PR-MIM aggregates before
  MAE's ``decoder_norm``); its outputs fill the thrown positions, then the
  LayerNorm and the head run on the full grid, as for ``full``.

The loss (``multiscale_loss``) is the official one: at every level, the
squared error per cell (mean over the HOG values) weighted by the token
mask carried to that scale, divided by the sum of the weights, summed over
levels. A token's weight is 1 if decoded, ``thrown_weight`` if thrown and
reconstructed (PR-MIM), 0 if visible or thrown by partial reconstruction;
the weights carry to a finer scale by repetition (each of the ``s x s``
cells of a token has its weight) and to scale 0.5 by the mean over the 2x2
tokens of a cell (the official ``recal_mask``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from prmim_jax.models import aggregate, layers, vit
from prmim_jax.models import mae as mae_lib

HEAD_SCALES = (4.0, 2.0, 1.0, 0.5)


class LocalMIMOutput(NamedTuple):
    latent: jax.Array  # [B, 1 + N_vis, D] the encoder's output (last block, final norm), cls first
    predictions: tuple[jax.Array, ...]  # per level: [B, g_h * s, g_w * s, channels * bins] float32


def pytorch_conv_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d / ConvTranspose2d weight and bias init, U(+-1/sqrt(fan_in)): the official model
    leaves its heads' convolutions at their defaults."""
    return layers.uniform_init(1.0 / math.sqrt(fan_in))


class UpsampleConv(nn.Module):
    """A 2x2 transposed convolution of stride 2 (PyTorch's ``ConvTranspose2d(C, features, 2, stride=2)``):
    ``[B, H, W, C] -> [B, 2H, 2W, features]``, every input pixel spread over its own 2x2 output pixels.

    Parameters ``kernel [2, 2, C, features]`` (``kernel[a, b, c, o]`` is PyTorch's ``weight[c, o, a, b]``) and
    ``bias [features]``, initialised as PyTorch's, whose fan-in of a transposed convolution is
    ``features * 2 * 2``.
    """

    features: int

    @nn.compact
    def __call__(self, grid):
        batch, height, width, channels = grid.shape
        init = pytorch_conv_init(self.features * 4)
        # The output channels are named like the bias and the LayerNorm that read them.
        kernel = self.param("kernel", layers.logical(init, None, None, None, "embed"), (2, 2, channels, self.features))
        bias = self.param("bias", layers.logical(init, "embed"), (self.features,))
        out = jnp.einsum("bhwc,ijco->bhiwjo", grid, kernel)
        return out.reshape(batch, 2 * height, 2 * width, self.features) + bias


class ScaleHead(nn.Module):
    """The official head of one scale (module docstring table): ``[B, g_h, g_w, C] -> [B, g_h * s, g_w * s,
    features] float32``. Float32 whatever the model's dtype: its output is the loss's input."""

    scale: float
    features: int

    @nn.compact
    def __call__(self, grid):
        grid = grid.astype(jnp.float32)
        width = grid.shape[-1]
        if self.scale == 4.0:
            x = UpsampleConv(width // 2, name="up_0")(grid)
            x = layers.gelu(layers.layer_norm(jnp.float32, "norm")(x))
            x = UpsampleConv(width // 4, name="up_1")(x)
        elif self.scale == 2.0:
            x = UpsampleConv(width // 2, name="up_0")(grid)
        elif self.scale == 1.0:
            x = grid
        elif self.scale == 0.5:
            x = layers.mean_pool(grid, 2)
        else:
            raise ValueError(f"scale={self.scale}; LocalMIM's heads exist for {HEAD_SCALES}.")
        fan_in = x.shape[-1]
        return layers.FlatDense(
            self.features,
            kernel_init=layers.logical(pytorch_conv_init(fan_in), "embed", "patch"),
            bias_init=layers.logical(pytorch_conv_init(fan_in), "patch"),
            name="pred",
        )(x)


class Level(nn.Module):
    """One reconstruction level: decoder, optional aggregation of the thrown tokens, LayerNorm, scatter onto the
    token grid, head (the module docstring).

    ``latent [B, 1 + N_vis, D]`` (a tapped block after its norm), ``ids_visible [B, N_vis]``,
    ``ids_decoded [B, N_dec]``, ``ids_thrown [B, N_thr]`` -> ``[B, g_h * s, g_w * s, features] float32``.
    """

    grid: tuple[int, int]
    scale: float
    features: int
    width: int = 256
    depth: int = 1
    num_heads: int = 8
    mlp_dim: int = 1024
    aggregation_kernel: int = 0  # > 0: PR-MIM's aggregation (models.aggregate) reconstructs the thrown tokens
    aggregator: str = "dwconv"
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    def setup(self):
        self.decoder = mae_lib.Decoder(
            self.grid,
            self.width,
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.attention_impl,
            self.remat,
        )
        if self.aggregation_kernel:
            self.aggregation = mae_lib.decoder_aggregation(self.decoder, self.aggregator, self.aggregation_kernel)
        self.norm = layers.layer_norm(jnp.float32)
        self.head = ScaleHead(self.scale, self.features)

    def __call__(self, latent, ids_visible, ids_decoded, ids_thrown):
        features = self.decoder(latent, ids_visible, ids_decoded)[:, 1:]  # the cls token predicts nothing
        ids = jnp.concatenate([ids_visible, ids_decoded], axis=1)
        if self.aggregation_kernel:
            thrown = self.aggregation(features, ids, ids_thrown).astype(features.dtype)
            features = jnp.concatenate([features, thrown], axis=1)
            ids = jnp.concatenate([ids, ids_thrown], axis=1)
        normed = self.norm(features.astype(jnp.float32))
        grid = aggregate.scatter_to_grid(normed, ids, self.grid[0] * self.grid[1], jnp.float32)
        return self.head(grid.reshape(grid.shape[0], *self.grid, self.width))


class LocalMIM(vit.VitFields):
    """Encoder with taps, one ``Level`` per tapped block (the module docstring).

    ``images [B, H, W, C]`` and the ids of ``prmim_jax.masking`` -> ``LocalMIMOutput``.
    ``tap_blocks`` are counted from 1, strictly increasing, the last one ``depth``;
    ``scales[k]`` is level ``k``'s head. ``aggregation_kernel = 0``: the thrown ids
    are ignored (``full``, ``partial``); ``> 0``: every level reconstructs them (PR-MIM).
    """

    tap_blocks: tuple[int, ...] = (2, 4, 10, 12)
    scales: tuple[float, ...] = HEAD_SCALES
    decoder_width: int = 256
    decoder_depth: int = 1
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 1024
    hog_bins: int = 9
    aggregation_kernel: int = 0
    aggregator: str = "dwconv"

    @property
    def hog_cells(self) -> tuple[int, ...]:
        """Each level's HOG cell side in pixels, ``patch_size / scale``."""
        return tuple(round(self.patch_size / scale) for scale in self.scales)

    @property
    def target_features(self) -> int:
        return self.channels * self.hog_bins

    @nn.compact
    def __call__(self, images, ids_visible, ids_decoded, ids_thrown=None) -> LocalMIMOutput:
        if images.shape[-1] != self.channels:
            raise ValueError(f"images have {images.shape[-1]} channels; the model was built for {self.channels}.")
        if ids_thrown is None:
            ids_thrown = jnp.zeros((ids_visible.shape[0], 0), jnp.int32)
        encoder = vit.encoder_like(self, taps=tuple(block - 1 for block in self.tap_blocks[:-1]), name="encoder")
        latent, tapped = encoder(images, ids_visible)
        latents = [layers.layer_norm(self.dtype, f"tap_norm_{k}")(x) for k, x in enumerate(tapped)] + [latent]
        predictions = tuple(
            Level(
                self.grid,
                scale,
                self.target_features,
                self.decoder_width,
                self.decoder_depth,
                self.decoder_num_heads,
                self.decoder_mlp_dim,
                self.aggregation_kernel,
                self.aggregator,
                self.dtype,
                self.attention_impl,
                self.remat,
                name=f"level_{k}",
            )(level_latent, ids_visible, ids_decoded, ids_thrown)
            for k, (scale, level_latent) in enumerate(zip(self.scales, latents, strict=True))
        )
        return LocalMIMOutput(latent, predictions)


# ---------------------------------------------------------------- the objective


def token_weights(ids_decoded: jax.Array, ids_thrown: jax.Array | None, num_tokens: int, thrown_weight: float = 0.0):
    """``[B, N] float32`` loss weight of every token: 1 at ``ids_decoded [B, N_dec]``, ``thrown_weight`` at
    ``ids_thrown [B, N_thr]`` (0: partial reconstruction), 0 at the visible tokens."""
    rows = jnp.arange(ids_decoded.shape[0])[:, None]
    weights = jnp.zeros((ids_decoded.shape[0], num_tokens), jnp.float32).at[rows, ids_decoded].set(1.0)
    if ids_thrown is not None and ids_thrown.shape[1] and thrown_weight:
        weights = weights.at[rows, ids_thrown].set(thrown_weight)
    return weights


def weights_at_scale(weights: jax.Array, grid: tuple[int, int], scale: float) -> jax.Array:
    """Token weights ``[B, N]`` carried to a head's grid: ``[B, g_h * s, g_w * s]`` (the module docstring)."""
    weights = weights.reshape(weights.shape[0], *grid)
    if scale >= 1:
        factor = int(scale)
        return jnp.repeat(jnp.repeat(weights, factor, axis=1), factor, axis=2)
    return layers.mean_pool(weights, round(1 / scale))


def multiscale_loss(predictions, targets, weights: jax.Array, grid: tuple[int, int], scales) -> tuple[jax.Array, list]:
    """``(loss, per-level losses)``, float32 scalars: the sum over levels of the weighted mean per-cell MSE.

    ``predictions`` and ``targets``: one ``[B, g_h * s, g_w * s, F]`` per level; ``weights [B, N]``
    (``token_weights``).
    """
    levels = []
    for prediction, target, scale in zip(predictions, targets, scales, strict=True):
        cell_weights = weights_at_scale(weights, grid, scale)
        error = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
        levels.append(jnp.sum(error * cell_weights) / jnp.sum(cell_weights))
    return sum(levels), levels


# ---------------------------------------------------------------- config


def model_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section of a LocalMIM experiment, the official ViT defaults: ``vit.backbone_config``'s keys,
    ``tap_blocks`` (counted from 1; ``None`` is the official rule ``(2, 4, depth - 2, depth)``), ``scales``,
    each level's decoder (``decoder_width`` 256, ``decoder_depth`` 1, ``decoder_num_heads`` 8,
    ``decoder_mlp_ratio``) and ``hog_bins``.
    """
    config = vit.backbone_config(
        variant,
        tap_blocks=None,
        scales=HEAD_SCALES,
        decoder_width=256,
        decoder_depth=1,
        decoder_num_heads=8,
        decoder_mlp_ratio=4.0,
        hog_bins=9,
    )
    config.update(overrides)
    return config


def check_levels(tap_blocks, scales, depth: int, grid: tuple[int, int], patch_size: int, decoder_width: int):
    """Raises ``ValueError`` (naming the fix) for taps and scales LocalMIM cannot build."""
    if not tap_blocks or list(tap_blocks) != sorted(set(tap_blocks)) or tap_blocks[0] < 1:
        raise ValueError(f"tap_blocks={tap_blocks} must be strictly increasing block numbers counted from 1.")
    if tap_blocks[-1] != depth:
        raise ValueError(
            f"tap_blocks={tap_blocks} must end at the last block ({depth}): blocks above the deepest tap would "
            "get no training signal, and its norm is the encoder's final norm."
        )
    if len(scales) != len(tap_blocks):
        raise ValueError(f"scales={scales} must give one head scale per tapped block {tap_blocks}.")
    if decoder_width % 4:
        raise ValueError(f"decoder_width={decoder_width} must be divisible by 4 (the scale-4 head's channels).")
    for scale in scales:
        if scale not in HEAD_SCALES:
            raise ValueError(f"scale {scale} has no LocalMIM head; choose from {HEAD_SCALES}.")
        if scale < 1 and (grid[0] % 2 or grid[1] % 2):
            raise ValueError(f"scale {scale} pools 2x2 tokens; the {grid[0]}x{grid[1]} token grid must be even.")
        cell = patch_size / scale
        if cell != int(cell) or cell < 1:
            raise ValueError(
                f"scale {scale} needs HOG cells of patch_size / scale = {cell} pixels, not a whole number; use "
                "a coarser scale (each scale s reads cells of patch_size / s pixels) or a larger patch."
            )


def build_localmim(
    config: ml_collections.ConfigDict, aggregation_kernel: int = 0, aggregator: str = "dwconv"
) -> LocalMIM:
    """A ``LocalMIM`` from a ``model_config``-shaped section; raises ``ValueError`` on impossible sizes."""
    size = vit.encoder_size(config)
    image_size = vit.as_pair(config.image_size)
    grid = (image_size[0] // size.patch_size, image_size[1] // size.patch_size)
    tap_blocks = config.tap_blocks
    tap_blocks = (2, 4, size.depth - 2, size.depth) if tap_blocks is None else tuple(int(b) for b in tap_blocks)
    scales = tuple(float(s) for s in config.scales)
    check_levels(tap_blocks, scales, size.depth, grid, size.patch_size, config.decoder_width)
    if config.decoder_width % config.decoder_num_heads:
        raise ValueError(
            f"decoder_width={config.decoder_width} must be divisible by decoder_num_heads={config.decoder_num_heads}."
        )
    return LocalMIM(
        **vit.backbone_fields(config, config.decoder_width // config.decoder_num_heads),
        tap_blocks=tap_blocks,
        scales=scales,
        decoder_width=config.decoder_width,
        decoder_depth=config.decoder_depth,
        decoder_num_heads=config.decoder_num_heads,
        decoder_mlp_dim=int(config.decoder_width * config.decoder_mlp_ratio),
        hog_bins=config.hog_bins,
        aggregation_kernel=aggregation_kernel,
        aggregator=aggregator,
    )
