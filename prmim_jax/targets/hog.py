"""Histograms of oriented gradients (HOG), LocalMIM's multi-scale reconstruction targets.

For every image channel separately (R, G, B of a normalised image):

1. Sobel gradients with reflect padding (the edge pixel is not repeated:
   ``jnp.pad(mode='reflect')``, PyTorch's ``padding_mode='reflect'``):
   ``g_h = left - right`` and ``g_v = top - bottom``, each side the 1-2-1
   weighted sum of the three neighbouring pixels on that side.
2. Magnitude ``sqrt(g_h^2 + g_v^2)`` and orientation ``atan2(g_h, g_v)`` (the
   official LocalMIM's argument order), binned without sign: bin
   ``floor(9 * angle / pi) mod 9``, so an angle and its opposite share a bin.
3. Each pixel adds its magnitude to its bin; the histograms are averaged over
   square cells of ``cell x cell`` pixels.
4. Each cell's histogram is divided by its L2 norm over the bins
   (``max(norm, 1e-12)``, ``torch.nn.functional.normalize``).

The result has ``C * bins`` values per cell, channel-major (channel 0's bins,
then channel 1's, ...): 27 for RGB and 9 bins. ViT-B/16 at 224 reads cells of
4 / 8 / 16 / 32 pixels, grids of 56 / 28 / 14 / 7 cells.

Computed on the device, inside the loss, from the augmented image: the four
scales are a negligible share of the LocalMIM train step's FLOPs, and their
buffers are dead before the step's peak, which barely grows. On the host they
would cost milliseconds per image on one thread and send three times the uint8
image's bytes to the device (27 float32 values per cell, four scales). XLA
CPU's counts and the host timing: ``benchmarks/results/cost_localmim_cpu.md``
(``benchmarks/hog_targets.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from prmim_jax.models import layers

NUM_BINS = 9
NORM_EPS = 1e-12  # torch.nn.functional.normalize's


def sobel_gradients(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, H, W, C]`` -> ``(g_h, g_v)``, each ``[B, H, W, C] float32``: left minus right, top minus bottom."""
    height, width = images.shape[1:3]
    padded = jnp.pad(images.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")

    def shifted(dy, dx):
        return padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    def side(offsets):
        (a, b, c) = offsets
        return shifted(*a) + 2.0 * shifted(*b) + shifted(*c)

    left = side(((-1, -1), (0, -1), (1, -1)))
    right = side(((-1, 1), (0, 1), (1, 1)))
    top = side(((-1, -1), (-1, 0), (-1, 1)))
    bottom = side(((1, -1), (1, 0), (1, 1)))
    return left - right, top - bottom


def pixel_histograms(images: jax.Array, bins: int = NUM_BINS) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H, W, C, bins] float32``: each pixel's gradient magnitude in its orientation bin."""
    g_h, g_v = sobel_gradients(images)
    magnitude = jnp.sqrt(g_h * g_h + g_v * g_v)
    orientation = jnp.floor(jnp.arctan2(g_h, g_v) / math.pi * bins).astype(jnp.int32) % bins
    return jnp.where(orientation[..., None] == jnp.arange(bins), magnitude[..., None], 0.0)


def _normalise(histograms: jax.Array) -> jax.Array:
    """``[B, h, w, C, bins]`` -> ``[B, h, w, C * bins]``, each histogram divided by its L2 norm."""
    norm = jnp.sqrt(jnp.sum(histograms * histograms, axis=-1, keepdims=True))
    out = histograms / jnp.maximum(norm, NORM_EPS)
    return out.reshape(*out.shape[:3], -1)


def check_cells(image_size: tuple[int, int], cells) -> None:
    """Raises ``ValueError`` unless every cell is a positive integer that tiles the image."""
    for cell in cells:
        if not isinstance(cell, int) or cell < 1 or image_size[0] % cell or image_size[1] % cell:
            raise ValueError(f"HOG cell of {cell} pixels does not tile a {image_size[0]}x{image_size[1]} image.")


def multiscale_hog(images: jax.Array, cells: tuple[int, ...], bins: int = NUM_BINS) -> tuple[jax.Array, ...]:
    """HOG of the module docstring at several cell sizes.

    Args:
      images: ``[B, H, W, C]`` (normalised pixels; any float dtype).
      cells: cell sides in pixels, each dividing ``H`` and ``W`` (e.g. ``(4, 8, 16, 32)``).
      bins: orientation bins over pi.

    Returns:
      One ``[B, H / cell, W / cell, C * bins] float32`` per cell, in the order of ``cells``.
      No gradient flows into ``images``.
    """
    images = jax.lax.stop_gradient(images)
    check_cells(tuple(images.shape[1:3]), cells)
    finest = min(cells)
    # Every coarser cell is a block of finest cells, so it pools the finest means (a mean of equal-sized
    # means): the per-pixel histograms are read once, by one reduction that XLA fuses them into.
    base = layers.mean_pool(pixel_histograms(images, bins), finest)

    def pooled(cell):
        if cell % finest:
            return layers.mean_pool(pixel_histograms(images, bins), cell)
        return layers.mean_pool(base, cell // finest)

    return tuple(_normalise(pooled(cell)) for cell in cells)


def hog(images: jax.Array, cell: int, bins: int = NUM_BINS) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H / cell, W / cell, C * bins] float32``: HOG at one cell size."""
    return multiscale_hog(images, (cell,), bins)[0]
