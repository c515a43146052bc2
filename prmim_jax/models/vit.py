"""Vision Transformer pieces shared by the MAE encoder, decoder and classifiers.

Every parameter and activation names logical axes only; the mapping to mesh
axes lives in config (``prmim_jax.sharding``). Logical names used here:

- ``batch``, ``tokens``: activation leading axes.
- ``embed``: model width; ``decoder_embed`` is the decoder width where one
  kernel holds both widths (the encoder -> decoder projection).
- ``mlp``: hidden width of the feed-forward block.
- ``heads``, ``kv``: attention heads and per-head width.
- ``patch``: flattened pixels of one patch, ``p * p * C``.

Initialisation follows the official MAE (facebookresearch/mae) so that
training from scratch behaves like the reference: xavier-uniform linears with
the fans of the PyTorch weight matrix (the fused ``qkv`` is one ``[3D, D]``
matrix there, so q, k and v use those fans), zero biases, LayerNorm 1 / 0.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax.models import tokens

LAYER_NORM_EPS = 1e-6

# name -> (width, depth, heads), the ViT paper's and MAE's sizes; mlp is 4 x width.
VIT_SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class VitSize:
    width: int
    depth: int
    num_heads: int
    patch_size: int


def parse_variant(variant: str) -> VitSize:
    """``'B/16'`` -> ``VitSize(768, 12, 12, 16)``; any patch size, sizes of ``VIT_SIZES``."""
    match = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
    if not match:
        raise ValueError(
            f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_SIZES)} '/' patch size, e.g. 'B/16'."
        )
    width, depth, heads = VIT_SIZES[match.group(1)]
    return VitSize(width, depth, heads, int(match.group(2)))


def encoder_size(config) -> VitSize:
    """The encoder size of a model config: ``variant`` with any ``width`` / ``depth`` / ``num_heads`` /
    ``patch_size`` override; raises ``ValueError`` (with the fix) when it cannot tile ``image_size``."""
    size = parse_variant(config.variant)
    size = VitSize(
        config.get("width") or size.width,
        config.get("depth") or size.depth,
        config.get("num_heads") or size.num_heads,
        config.get("patch_size") or size.patch_size,
    )
    image_size = config.image_size
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if image_size[0] % size.patch_size or image_size[1] % size.patch_size:
        raise ValueError(
            f"image_size {image_size} is not a multiple of patch_size {size.patch_size}; change one of them."
        )
    if size.width % size.num_heads or size.width % 4:
        raise ValueError(
            f"width={size.width} must be divisible by its number of heads ({size.num_heads}) and by 4 (2-D sin-cos table)."
        )
    return size


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """``[M, embed_dim] float64``: ``[sin(pos * w) | cos(pos * w)]``, ``w_i = 10000^(-2i / embed_dim)``."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}.")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], with_cls: bool = True) -> np.ndarray:
    """The official MAE's fixed 2-D position table.

    Args:
      embed_dim: width, a multiple of 4.
      grid: ``(rows, cols)`` of the token grid.
      with_cls: prepend an all-zero row for the cls token.

    Returns:
      ``[(1 if with_cls) + rows * cols, embed_dim] float32``: row-major tokens,
      each ``[sin(col) | cos(col) | sin(row) | cos(row)]``, computed in float64.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}.")
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    if with_cls:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


def path_names(path) -> list[str]:
    """A parameter's tree path as names, without the ``value`` of logically partitioned (boxed) leaves."""
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    return names[:-1] if names[-1] == "value" else names


def uniform_init(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound), the form of PyTorch's xavier-uniform and default bias inits."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform(fan_in: int, fan_out: int) -> nn.initializers.Initializer:
    """xavier-uniform with explicit fans, so reshaped kernels keep PyTorch's fans."""
    return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


def layer_norm(dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=logical(nn.initializers.ones, "embed"),
        bias_init=logical(nn.initializers.zeros, "embed"),
        name=name,
    )


def dense(features: int, fan_in: int, axes: tuple[str, str], dtype, name: str, fan_out: int | None = None) -> nn.Dense:
    """A linear layer initialised as the official MAE's ``nn.Linear`` (xavier-uniform weight, zero bias)."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=logical(xavier_uniform(fan_in, fan_out or features), *axes),
        bias_init=logical(nn.initializers.zeros, axes[1]),
        name=name,
    )


class HeadProjection(nn.Module):
    """``[B, T, D] -> [B, T, heads, kv]`` with kernel ``[D, heads, kv]`` and bias ``[heads, kv]``.

    Written out rather than ``nn.DenseGeneral``, which initialises a flattened
    kernel and so cannot carry the three logical axis names through init.
    """

    num_heads: int
    head_dim: int
    kernel_init: nn.initializers.Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.num_heads, self.head_dim)
        kernel = self.param("kernel", logical(self.kernel_init, "embed", "heads", "kv"), shape)
        bias = self.param("bias", logical(nn.initializers.zeros, "heads", "kv"), shape[1:])
        return jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class HeadMerge(nn.Module):
    """``[B, T, heads, kv] -> [B, T, D]`` with kernel ``[heads, kv, D]`` and bias ``[D]``."""

    features: int
    kernel_init: nn.initializers.Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-2], x.shape[-1], self.features)
        kernel = self.param("kernel", logical(self.kernel_init, "heads", "kv", "embed"), shape)
        bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.features,))
        return jnp.einsum("bthk,hkd->btd", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (with bias).

    ``[B, T, D] -> [B, T, D]``. Kernels are ``[D, heads, kv]`` (q, k, v) and
    ``[heads, kv, D]`` (out); the checkpoint tools fuse them into the official
    ``qkv`` / ``proj`` matrices.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None  # jax.nn.dot_product_attention's implementation: None, 'xla', 'cudnn'

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        # The official MAE initialises q, k, v as one [3D, D] linear.
        qkv_init = xavier_uniform(width, 3 * width)
        qkv_axes = ("batch", "tokens", "heads", "kv")
        query, key, value = (
            nn.with_logical_constraint(
                HeadProjection(self.num_heads, head_dim, qkv_init, self.dtype, name=name)(x), qkv_axes
            )
            for name in ("query", "key", "value")
        )
        attended = jax.nn.dot_product_attention(query, key, value, implementation=self.attention_impl)
        attended = nn.with_logical_constraint(attended, qkv_axes)
        out = HeadMerge(width, xavier_uniform(width, width), self.dtype, name="out")(attended)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))


class MlpBlock(nn.Module):
    """``[B, T, D] -> [B, T, D]``: linear to ``mlp_dim``, exact (erf) GELU, linear back."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = dense(self.mlp_dim, width, ("embed", "mlp"), self.dtype, "fc1")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=False), ("batch", "tokens", "mlp"))
        out = dense(width, self.mlp_dim, ("mlp", "embed"), self.dtype, "fc2")(h)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` as used by MAE): ``[B, T, D] -> [B, T, D]``.

    ``drop_path`` > 0 drops each residual branch for a whole example with that
    probability while training (stochastic depth), scaling kept ones by
    ``1 / (1 - drop_path)``; it needs the ``'dropout'`` rng unless ``deterministic``.
    """

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        # One keep/drop decision per example: broadcast over tokens and width.
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=deterministic or not self.drop_path)
        x = x + drop(
            Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(layer_norm(self.dtype, "norm1")(x))
        )
        x = x + drop(MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x)))
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


class Transformer(nn.Module):
    """``depth`` blocks, then a final LayerNorm when ``final_norm``: ``[B, T, D] -> [B, T, D]``.

    Block ``i`` drops its branches with ``drop_path_rate * i / (depth - 1)``
    (MAE's linear rule). ``frozen_blocks = k`` stops gradients below block
    ``k``: the embeddings and the first ``k`` blocks get none (partial
    fine-tuning and linear probing skip their backward pass).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    final_norm: bool = True
    drop_path_rate: float = 0.0
    frozen_blocks: int = 0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.depth):
            if i == self.frozen_blocks and i:
                x = jax.lax.stop_gradient(x)
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = Block(self.num_heads, self.mlp_dim, self.dtype, self.attention_impl, rate, name=f"block_{i}")(
                x, deterministic
            )
        if self.frozen_blocks >= self.depth:
            x = jax.lax.stop_gradient(x)
        return layer_norm(self.dtype, "norm")(x) if self.final_norm else x


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C] -> [B, N, p * p * C]``, row-major tokens, pixels in the official ``(p, q, c)`` order."""
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}.")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of ``patchify``: ``[B, N, p * p * C] -> [B, H, W, C]``."""
    batch = patches.shape[0]
    channels = patches.shape[-1] // (patch_size * patch_size)
    x = patches.reshape(batch, grid[0], grid[1], patch_size, patch_size, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, grid[0] * patch_size, grid[1] * patch_size, channels)


class Encoder(nn.Module):
    """MAE's ViT encoder over the visible tokens.

    ``images [B, H, W, C]``, ``ids_visible [B, N_vis] int32`` (or ``None`` for
    every token) -> ``[B, 1 + N_vis, width]``: the cls token then the visible
    tokens in the order of ``ids_visible``, after the final LayerNorm (unless
    ``final_norm`` is False). Patches are gathered before the embedding, which
    equals MAE's embed-then-mask.

    Pretraining keeps the 2-D sin-cos position table fixed. Fine-tuning
    (``learned_pos_embedding``) makes it a parameter ``pos_embedding [1 + N,
    width]``, initialised with the table, as MAE's fine-tuning ViT does;
    ``drop_path_rate`` and ``frozen_blocks`` are ``Transformer``'s.
    """

    patch_size: int
    image_size: tuple[int, int]
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    final_norm: bool = True
    learned_pos_embedding: bool = False
    drop_path_rate: float = 0.0
    frozen_blocks: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @nn.compact
    def __call__(self, images, ids_visible=None, deterministic: bool = True):
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            raise ValueError(f"images are {images.shape[1:3]}; the model was built for {self.image_size}.")
        patches = patchify(images, self.patch_size)
        pos = jnp.asarray(sincos_2d(self.width, self.grid))
        if self.learned_pos_embedding:
            pos = self.param("pos_embedding", logical(lambda *_: pos, None, "embed"), pos.shape)
        pos_cls, pos_tokens = pos[:1], pos[1:]
        pos_tokens = jnp.broadcast_to(pos_tokens, (patches.shape[0], *pos_tokens.shape))
        if ids_visible is not None:
            patches = tokens.take(patches, ids_visible)
            pos_tokens = tokens.take(pos_tokens, ids_visible)
        patch_dim = patches.shape[-1]
        # The official MAE initialises the Conv2d patch embedding's weight as a linear
        # and leaves its bias at PyTorch's Conv2d default, U(+-1/sqrt(fan_in)).
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            kernel_init=logical(xavier_uniform(patch_dim, self.width), "patch", "embed"),
            bias_init=logical(uniform_init(1.0 / math.sqrt(patch_dim)), "embed"),
            name="patch_embed",
        )(patches.astype(self.dtype))
        x = x + pos_tokens.astype(self.dtype)
        cls_token = self.param(
            "cls_token", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width)
        )
        cls_token = jnp.broadcast_to(cls_token + pos_cls, (x.shape[0], 1, self.width)).astype(self.dtype)
        x = nn.with_logical_constraint(jnp.concatenate([cls_token, x], axis=1), ("batch", "tokens", "embed"))
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.attention_impl,
            self.final_norm,
            self.drop_path_rate,
            self.frozen_blocks,
            name="transformer",
        )(x, deterministic)


def interpolate_pos_embedding(table: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """A position table for another token grid (fine-tuning at another resolution than pretraining).

    ``table [1 + rows * cols, D]`` (cls row first) -> ``[1 + new_rows * new_cols, D]``:
    the cls row is kept, the grid rows are resized bicubically as images of
    ``D`` channels (MAE's ``interpolate_pos_embed``; jax's cubic kernel is Keys'
    a = -0.5 where PyTorch's is -0.75, so values differ slightly from MAE's).
    """
    if table.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"position table of {table.shape[0]} rows does not fit the grid {old_grid} plus cls.")
    if tuple(old_grid) == tuple(new_grid):
        return table
    grid = table[1:].reshape(*old_grid, table.shape[-1])
    resized = jax.image.resize(grid, (*new_grid, table.shape[-1]), method="cubic", antialias=False)
    return jnp.concatenate([table[:1], resized.reshape(-1, table.shape[-1]).astype(table.dtype)], axis=0)
