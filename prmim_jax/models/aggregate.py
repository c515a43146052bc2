"""Progressive reconstruction: a k x k depth-wise aggregation of the decoder outputs, read at the thrown tokens.

The paper scatters the decoder outputs of the visible and decoded tokens onto
the token grid, fills the thrown positions with zeros, and applies a 7x7
depth-wise convolution whose outputs at the thrown positions become the thrown
tokens' features. We do exactly that, with the convolution's gradient written
by hand: XLA on CPU lowers the kernel gradient of a ``feature_group_count=C``
convolution to a dense ``C x C`` convolution (about 3.9 GFLOPs per image at
C = 512, seven percent of a whole MAE step), while ours costs, like the
forward pass, ``O(N k^2 C)`` per image: at ViT-B, 196 * 49 * 512 = 4.9e-3
GMACs, under 0.1% of the step.

Why the whole grid rather than the thrown tokens alone (``N_thr k^2 C``, half
the MACs at rho_d = 0.5): a per-tap gather formulation makes XLA on CPU keep
all ``k * k`` gathered copies of the thrown tokens alive at once and repeat
the tap sum inside every consumer fusion, which measured ten times the
convolution's cost; the grid is small (N = 196 at ViT-B), so the convolution
is both cheaper in practice and simpler.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax.models import tokens, vit


@jax.custom_vjp
def depthwise_conv(grid: jax.Array, kernel: jax.Array) -> jax.Array:
    """A ``k x k`` depth-wise cross-correlation with zero padding: ``[B, H, W, C]``, ``[k, k, C]`` -> ``[B, H, W, C]``.

    The gradients are written out: the input gradient is the same depth-wise
    convolution with the flipped kernel, and the kernel gradient ``k * k``
    reductions of shifted grids, ``O(B H W k^2 C)`` like the forward pass (XLA's
    own kernel gradient of a grouped convolution becomes a dense ``C x C``
    convolution on CPU). The kernel gradient runs as a loop over the taps, and
    XLA's cost analysis counts a loop body once: of its ``2 k^2 N C`` FLOPs per
    image only ``2 N C`` appear in ``cost_analysis()`` (at ViT-B, 9.6 MFLOPs
    per image go uncounted, 0.02% of a train step).
    """
    return _depthwise(grid, kernel)


def _pad(grid, radius):
    return jnp.pad(grid, ((0, 0), (radius, radius), (radius, radius), (0, 0)))


def _depthwise(grid, kernel):
    # A sum of k * k shifted copies: XLA fuses it into one loop over the grid. XLA's CPU
    # convolution would build a k * k times larger im2col buffer for a grouped convolution.
    size = kernel.shape[0]
    height, width = grid.shape[1:3]
    padded = _pad(grid, size // 2)
    out = jnp.zeros_like(grid)
    for dy in range(size):
        for dx in range(size):
            out = out + kernel[dy, dx] * padded[:, dy : dy + height, dx : dx + width]
    return out


def _depthwise_fwd(grid, kernel):
    return _depthwise(grid, kernel), (grid, kernel)


def _depthwise_bwd(residuals, cotangent):
    grid, kernel = residuals
    size = kernel.shape[0]
    padded = _pad(grid, size // 2)

    def tap_gradient(tap, kernel_grad):
        dy, dx = jnp.divmod(tap, size)
        window = jax.lax.dynamic_slice(padded, (0, dy, dx, 0), grid.shape)
        return kernel_grad.at[dy, dx].set(jnp.sum(window * cotangent, axis=(0, 1, 2)))

    # A loop, so XLA reads each shifted window straight from the padded grid instead of
    # materialising all k * k of them at once (which it does for 49 unrolled reductions on CPU).
    kernel_grad = jax.lax.fori_loop(0, size * size, tap_gradient, jnp.zeros_like(kernel))
    return _depthwise(cotangent, kernel[::-1, ::-1]), kernel_grad


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class ProgressiveAggregation(nn.Module):
    """Features of the thrown tokens from the decoder outputs of the other tokens.

    ``features [B, M, C]`` at ``ids_present [B, M]`` (the visible and decoded
    tokens, any order) and ``ids_thrown [B, T]`` -> ``[B, T, C]``: a ``k x k``
    depth-wise convolution with bias over the grid holding ``features`` and
    zeros at the thrown positions, read at the thrown positions. Parameters
    ``kernel [k, k, C]`` and ``bias [C]`` start as PyTorch's Conv2d defaults,
    U(+-1/k) (fan-in ``k * k`` per depth-wise channel).
    """

    grid: tuple[int, int]
    kernel_size: int = 7
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features, ids_present, ids_thrown):
        batch, _, width = features.shape
        bound = 1.0 / self.kernel_size
        kernel = self.param(
            "kernel",
            vit.logical(vit.uniform_init(bound), None, None, "embed"),
            (self.kernel_size, self.kernel_size, width),
        )
        bias = self.param("bias", vit.logical(vit.uniform_init(bound), "embed"), (width,))
        num_tokens = self.grid[0] * self.grid[1]
        rows = jnp.arange(batch)[:, None]
        grid = jnp.zeros((batch, num_tokens, width), self.dtype).at[rows, ids_present].set(features.astype(self.dtype))
        grid = depthwise_conv(grid.reshape(batch, *self.grid, width), kernel.astype(self.dtype))
        out = tokens.take(grid.reshape(batch, num_tokens, width), ids_thrown) + bias.astype(self.dtype)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))
