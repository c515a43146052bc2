"""Progressive reconstruction: aggregations of the decoder outputs, read at the thrown tokens.

Every aggregator (``AGGREGATORS``, built by ``build_aggregator``) takes
``features [B, M, C]`` (decoder outputs) at ``ids_present [B, M]`` (the
visible and decoded tokens, any order) and ``ids_thrown [B, T]``, places the
features on the token grid with zeros at the thrown positions (the paper's
"fill the thrown tokens with zero values and rearrange all tokens from
sequence to spatial format") and returns ``[B, T, C]`` in the order of
``ids_thrown``, in the module's ``dtype``. The designs are those of the
paper's Table 12 (ViT-B: grid 14x14, decoder width C = 512, the paper's
counts are MACs over the whole grid):

- ``dwconv`` (the paper's default, ``ProgressiveAggregation``): a ``k x k``
  depth-wise convolution with bias, ``N k^2 C`` MACs: 4.9e-3 G at k = 7
  (the paper's 7.3e-3 is this count at C = 768).
  Parameters ``kernel [k, k, C]`` and ``bias [C]``, PyTorch's Conv2d layout
  after a transpose (checkpoints and the PyTorch export rely on these names).
- ``convnext``: a ConvNeXt block (the paper cites ConvNeXt V2, ref. [58], and
  is otherwise silent, so its standard form): ``k x k`` depth-wise convolution
  with bias, LayerNorm, pointwise MLP ``C -> 4C -> C`` with exact GELU,
  optional layer scale, residual. The residual input at a thrown position is
  the zero fill, so a thrown token's output is the MLP branch alone. Layer
  scale is off by default: ConvNeXt V1's ``1e-6`` would start every thrown
  prediction at zero, and ConvNeXt V2 dropped it. The paper's 0.41 GMACs is
  ``N (k^2 C + 8 C^2)``: the MLP at every grid token.
- ``transformer``: a pre-norm ViT block (``vit.Block``: LayerNorm, multi-head
  self-attention, LayerNorm, MLP ``C -> 4C -> C``, two residuals) over all
  ``N`` grid tokens. Before the block the fixed 2-D sin-cos table of the grid
  is added to every token, as a ViT adds it to its input: the thrown positions
  hold zeros, and without a position they would all send the same query and
  get the same output. They get no learned token: the paper fills zeros for
  every design, a position is what a thrown token lacks, and the LayerNorm
  and projection biases already learn what an empty position sends. The
  attention is global, so ``kernel_size`` plays no part: the paper's 0.65
  GMACs is ``12 N C^2 + 2 N^2 C`` (global attention over the 196 tokens; a
  7x7 local window would be 0.63).
- ``avgpool``: the mean of the present tokens in the ``k x k`` window, no
  parameters. The thrown positions' zeros and the out-of-grid padding are left
  out of the count, so they are not read as inputs; a window with no present
  token gives zero. Counting them (PyTorch's ``AvgPool2d`` over the zero-filled
  grid) would only scale each output by ``present / k^2``, which the pixel
  head's LayerNorm removes. The paper gives it no FLOPs ("-", fvcore does not
  count pooling) and so no projection either; it reports that it fails to
  converge, for want of learned spatial weights.

What is computed is what is read. ``convnext`` and ``transformer`` apply
their per-token parts after the spatial mixing (the ConvNeXt block's
LayerNorm and MLP, the Transformer block's second residual and MLP) only at
the thrown tokens, the only ones anyone reads; the outputs are exactly the
whole-grid block's (tested against it), at 0.50 (convnext) and 0.69
(transformer) of its MACs at ViT-B and rho_d = 0.5. ``whole_grid=True``
evaluates the block at every grid token, the form the paper counts, for cost
comparisons. ``benchmarks/aggregators.py`` measures every design with XLA's
cost analysis.

The depth-wise convolution's gradient is written by hand: XLA on CPU lowers
the kernel gradient of a ``feature_group_count=C`` convolution to a dense
``C x C`` convolution (``C`` times the work), while ours costs, like the
forward pass, ``O(N k^2 C)`` per image: at ViT-B, 196 * 49 * 512 = 4.9e-3
GMACs, under 0.1% of the step. XLA's count of its own gradient and both
timed: ``benchmarks/results/design_choices_cpu.md``, "depthwise".

Why the whole grid rather than the thrown tokens alone (``N_thr k^2 C``, half
the MACs at rho_d = 0.5): a per-tap gather formulation makes XLA on CPU keep
all ``k * k`` gathered copies of the thrown tokens alive at once and repeat
the tap sum inside every consumer fusion, which costs an order of magnitude
more than the whole-grid convolution (timed in the same file); the grid is
small (N = 196 at ViT-B), so the convolution is both cheaper in practice and
simpler.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax.models import attention as attention_lib
from prmim_jax.models import layers, tokens, vit


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


def depthwise_parameters(module: nn.Module, kernel_size: int, width: int) -> tuple[jax.Array, jax.Array]:
    """``(kernel [k, k, C], bias [C])`` of a depth-wise convolution, made in ``module``'s call, initialised as
    PyTorch's Conv2d: U(+-1/k) (fan-in ``k * k`` per depth-wise channel)."""
    bound = 1.0 / kernel_size
    kernel = module.param(
        "kernel", layers.logical(layers.uniform_init(bound), None, None, "embed"), (kernel_size, kernel_size, width)
    )
    return kernel, module.param("bias", layers.logical(layers.uniform_init(bound), "embed"), (width,))


class WindowAggregation(nn.Module):
    """What an aggregator that reads each thrown token's ``kernel_size x kernel_size`` window of the token
    ``grid`` is built from (the depth-wise convolution, the average pool); ``dtype`` is the compute dtype."""

    grid: tuple[int, int]
    kernel_size: int = 7
    dtype: jnp.dtype = jnp.float32


class ProgressiveAggregation(WindowAggregation):
    """Features of the thrown tokens from the decoder outputs of the other tokens.

    ``features [B, M, C]`` at ``ids_present [B, M]`` (the visible and decoded
    tokens, any order) and ``ids_thrown [B, T]`` -> ``[B, T, C]``: a ``k x k``
    depth-wise convolution with bias over the grid holding ``features`` and
    zeros at the thrown positions, read at the thrown positions. Parameters
    ``kernel [k, k, C]`` and ``bias [C]`` start as PyTorch's Conv2d defaults,
    U(+-1/k) (fan-in ``k * k`` per depth-wise channel).
    """

    @nn.compact
    def __call__(self, features, ids_present, ids_thrown):
        batch, _, width = features.shape
        kernel, bias = depthwise_parameters(self, self.kernel_size, width)
        num_tokens = self.grid[0] * self.grid[1]
        rows = jnp.arange(batch)[:, None]
        grid = jnp.zeros((batch, num_tokens, width), self.dtype).at[rows, ids_present].set(features.astype(self.dtype))
        grid = depthwise_conv(grid.reshape(batch, *self.grid, width), kernel.astype(self.dtype))
        out = tokens.take(grid.reshape(batch, num_tokens, width), ids_thrown) + bias.astype(self.dtype)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))


AGGREGATORS = ("dwconv", "transformer", "convnext", "avgpool")

# Design-specific options of build_aggregator and the designs that use them. One set for all designs,
# so a caller can pass the decoder's num_heads / mlp_ratio whatever the design; a design ignores the rest.
AGGREGATOR_OPTIONS = {
    "num_heads": ("transformer",),
    "mlp_ratio": ("transformer", "convnext"),
    "attention_impl": ("transformer",),
    "layer_scale_init": ("convnext",),
    "whole_grid": ("transformer", "convnext"),
}

# Designs whose output at a thrown token reads only its k x k window.
LOCAL_AGGREGATORS = ("dwconv", "convnext", "avgpool")


def check_kernel_size(kernel_size: int, grid: tuple[int, int]) -> None:
    """Raises ``ValueError`` unless ``kernel_size`` is an odd window of at least 3 that fits ``grid``."""
    if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size={kernel_size!r}: the aggregation window must be an odd integer >= 3 so that it is "
            "centred on the thrown token and reaches a neighbour (1 sees only the zero fill); use 3, 5, 7 (the "
            "paper's default), 9 or 11."
        )
    if kernel_size > min(grid):
        raise ValueError(
            f"kernel_size={kernel_size} does not fit the {grid[0]}x{grid[1]} token grid; use an odd kernel_size "
            f"<= {min(grid)}, or a larger image / smaller patch."
        )


def build_aggregator(
    name: str, grid: tuple[int, int], kernel_size: int, dtype, width: int | None = None, **kw
) -> nn.Module:
    """The aggregator ``name`` (one of ``AGGREGATORS``; see the module docstring) for a ``grid`` of tokens.

    Every result maps ``(features [B, M, C], ids_present [B, M], ids_thrown [B, T]) -> [B, T, C] dtype``
    like ``ProgressiveAggregation``.

    Args:
      name: ``dwconv`` (the paper's), ``transformer``, ``convnext`` or ``avgpool``.
      grid: ``(rows, cols)`` of the token grid.
      kernel_size: the window of the local designs (odd, >= 3, at most the grid's
        side); ``transformer`` attends globally and ignores it.
      dtype: computation dtype (parameters stay float32).
      width: the feature width C, checked when given (the transformer's heads
        and sin-cos table need it divisible); ``None`` takes it from the features.
      **kw: ``num_heads`` (transformer, 16 as MAE's decoder), ``mlp_ratio``
        (transformer and convnext, 4), ``attention_impl`` (transformer),
        ``layer_scale_init`` (convnext, ``None``: no layer scale),
        ``whole_grid`` (transformer and convnext: evaluate the block at every
        grid token, the paper's cost; same outputs). A design ignores the
        options of the others.

    Raises:
      ValueError: an unknown name or option, a kernel size that is even, below 3
        or larger than the grid, or a width the design cannot use; the message
        says what to change.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {AGGREGATORS} ('dwconv' is the paper's).")
    unknown = sorted(set(kw) - set(AGGREGATOR_OPTIONS))
    if unknown:
        raise ValueError(f"unknown aggregator options {unknown}; the options are {sorted(AGGREGATOR_OPTIONS)}.")
    grid = tuple(grid)
    if name in LOCAL_AGGREGATORS:
        check_kernel_size(kernel_size, grid)
    options = {key: value for key, value in kw.items() if name in AGGREGATOR_OPTIONS[key]}
    if name == "dwconv":
        return ProgressiveAggregation(grid, kernel_size, dtype)
    if name == "avgpool":
        return AveragePoolAggregation(grid, kernel_size, dtype)
    if name == "convnext":
        return ConvNeXtAggregation(grid, kernel_size, dtype=dtype, width=width, **options)
    aggregator = TransformerAggregation(grid, dtype=dtype, width=width, **options)
    if width is not None:
        aggregator.check_width(width)
    return aggregator


def scatter_to_grid(features: jax.Array, ids_present: jax.Array, num_tokens: int, dtype) -> jax.Array:
    """``features [B, M, C]`` at ``ids_present [B, M]`` -> ``[B, num_tokens, C] dtype``, zeros elsewhere."""
    batch, _, width = features.shape
    rows = jnp.arange(batch)[:, None]
    grid = jnp.zeros((batch, num_tokens, width), dtype).at[rows, ids_present].set(features.astype(dtype))
    return nn.with_logical_constraint(grid, ("batch", "tokens", "embed"))


def _check_features_width(features: jax.Array, width: int | None) -> None:
    if width is not None and features.shape[-1] != width:
        raise ValueError(
            f"the aggregator was built for width {width} but the features have width {features.shape[-1]}; "
            "pass the decoder width to build_aggregator."
        )


class DepthwiseConv(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``: a ``k x k`` depth-wise convolution with bias (``depthwise_conv``).

    Parameters ``kernel [k, k, C]`` and ``bias [C]``, initialised as PyTorch's
    Conv2d, U(+-1/k), as ``ProgressiveAggregation``.
    """

    kernel_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, grid):
        kernel, bias = depthwise_parameters(self, self.kernel_size, grid.shape[-1])
        return depthwise_conv(grid.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class ConvNeXtAggregation(nn.Module):
    """A ConvNeXt block over the zero-filled grid, read at the thrown tokens (``convnext`` in the module docstring).

    ``(features [B, M, C], ids_present [B, M], ids_thrown [B, T]) -> [B, T, C] dtype``.
    Parameters: ``dwconv/{kernel [k, k, C], bias [C]}``, ``norm/{scale, bias} [C]``,
    ``mlp/fc1/{kernel [C, rC], bias}``, ``mlp/fc2/{kernel [rC, C], bias}`` and,
    with ``layer_scale_init``, ``layer_scale [C]``. The LayerNorm and MLP run at
    the thrown tokens only (``whole_grid``: at every token, then read; same outputs).
    """

    grid: tuple[int, int]
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = None
    dtype: jnp.dtype = jnp.float32
    width: int | None = None
    whole_grid: bool = False

    @nn.compact
    def __call__(self, features, ids_present, ids_thrown):
        _check_features_width(features, self.width)
        batch, _, width = features.shape
        num_tokens = self.grid[0] * self.grid[1]
        grid = scatter_to_grid(features, ids_present, num_tokens, self.dtype)
        mixed = DepthwiseConv(self.kernel_size, self.dtype, name="dwconv")(grid.reshape(batch, *self.grid, width))
        mixed = mixed.reshape(batch, num_tokens, width)
        if not self.whole_grid:
            # LayerNorm and MLP are per token: applying them only where the output is read is exact.
            mixed = tokens.take(mixed, ids_thrown)
        branch = layers.MlpBlock(int(width * self.mlp_ratio), self.dtype, name="mlp")(
            layers.layer_norm(self.dtype, "norm")(mixed)
        )
        if self.layer_scale_init is not None:
            scale = self.param(
                "layer_scale", layers.logical(nn.initializers.constant(self.layer_scale_init), "embed"), (width,)
            )
            branch = branch * scale.astype(self.dtype)
        if self.whole_grid:
            out = tokens.take(grid + branch, ids_thrown)
        else:
            out = branch  # the residual input at a thrown position is its zero fill
        return nn.with_logical_constraint(out.astype(self.dtype), ("batch", "tokens", "embed"))


class ThrownTokenBlock(nn.Module):
    """``vit.Block`` over ``x [B, N, C]`` read at the tokens ``ids [B, T]``: ``-> [B, T, C]``.

    Same parameter tree as ``vit.Block`` (``norm1``, ``attn``, ``norm2``,
    ``mlp``). The attention runs over all ``N`` tokens (``attention.Attention``
    itself, so its implementation and precision choices hold here too); the
    second residual and the MLP, per token, run at the ``T`` read ones.
    """

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, ids):
        attention = attention_lib.Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")
        attended = attention(layers.layer_norm(self.dtype, "norm1")(x))
        h = tokens.take(x + attended, ids)
        h = h + layers.MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layers.layer_norm(self.dtype, "norm2")(h))
        return nn.with_logical_constraint(h, ("batch", "tokens", "embed"))


class TransformerAggregation(nn.Module):
    """A pre-norm ViT block over the grid, read at the thrown tokens (``transformer`` in the module docstring).

    ``(features [B, M, C], ids_present [B, M], ids_thrown [B, T]) -> [B, T, C] dtype``.
    The grid holds the features, zeros at the thrown positions, plus the fixed
    sin-cos table ``vit.sincos_2d(C, grid)``; parameters are ``block/...`` with
    ``vit.Block``'s tree. Global attention: every output reads every grid token.
    By default the MLP runs at the thrown tokens only (``whole_grid``:
    ``vit.Block`` at every token, then read; same outputs).
    """

    grid: tuple[int, int]
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    width: int | None = None
    attention_impl: str | None = None
    whole_grid: bool = False

    def check_width(self, width: int) -> None:
        """Raises ``ValueError`` unless ``width`` splits into ``num_heads`` heads and fits a 2-D sin-cos table."""
        if width % self.num_heads or width % 4:
            raise ValueError(
                f"the transformer aggregator's width {width} must be divisible by num_heads={self.num_heads} "
                "and by 4 (2-D sin-cos table); pass num_heads= (e.g. the decoder's) that divides it."
            )

    @nn.compact
    def __call__(self, features, ids_present, ids_thrown):
        _check_features_width(features, self.width)
        width = features.shape[-1]
        self.check_width(width)
        num_tokens = self.grid[0] * self.grid[1]
        positions = jnp.asarray(vit.sincos_2d(width, self.grid, with_cls=False), self.dtype)
        x = scatter_to_grid(features, ids_present, num_tokens, self.dtype) + positions
        mlp_dim = int(width * self.mlp_ratio)
        if self.whole_grid:
            block = vit.Block(self.num_heads, mlp_dim, self.dtype, self.attention_impl, name="block")
            out = tokens.take(block(x), ids_thrown)
        else:
            block = ThrownTokenBlock(self.num_heads, mlp_dim, self.dtype, self.attention_impl, name="block")
            out = block(x, ids_thrown)
        return nn.with_logical_constraint(out.astype(self.dtype), ("batch", "tokens", "embed"))


def _box_sum(grid: jax.Array, size: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H, W, C]``: sums over the ``size x size`` window, zero outside the grid."""
    radius = size // 2
    for axis in (1, 2):
        window = [1, 1, 1, 1]
        window[axis] = size
        padding = [(0, 0)] * 4
        padding[axis] = (radius, radius)
        # Separable: two passes of `size` adds instead of size^2.
        grid = jax.lax.reduce_window(grid, 0.0, jax.lax.add, window, (1, 1, 1, 1), padding)
    return grid


class AveragePoolAggregation(WindowAggregation):
    """The mean of the present tokens in each thrown token's ``k x k`` window (``avgpool`` in the module docstring).

    ``(features [B, M, C], ids_present [B, M], ids_thrown [B, T]) -> [B, T, C] dtype``;
    no parameters. Thrown positions and positions outside the grid are not
    counted; a window without a present token gives zeros. Sums and counts
    are float32 whatever ``dtype`` (49 bfloat16 adds would lose the mean's
    low bits).
    """

    @nn.compact
    def __call__(self, features, ids_present, ids_thrown):
        batch, _, width = features.shape
        num_tokens = self.grid[0] * self.grid[1]
        grid = scatter_to_grid(features, ids_present, num_tokens, jnp.float32).reshape(batch, *self.grid, width)
        rows = jnp.arange(batch)[:, None]
        present = jnp.zeros((batch, num_tokens, 1), jnp.float32).at[rows, ids_present].set(1.0)
        sums = tokens.take(_box_sum(grid, self.kernel_size).reshape(batch, num_tokens, width), ids_thrown)
        counts = tokens.take(
            _box_sum(present.reshape(batch, *self.grid, 1), self.kernel_size).reshape(batch, num_tokens, 1),
            ids_thrown,
        )
        out = sums / jnp.maximum(counts, 1.0)
        return nn.with_logical_constraint(out.astype(self.dtype), ("batch", "tokens", "embed"))
