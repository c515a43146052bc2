"""The Vision Transformer: sizes, position tables, blocks, the encoder MAE and the classifiers share.

Layers and the precision policy are ``prmim_jax.models.layers``'s, attention is
``prmim_jax.models.attention``'s.

Rematerialisation (``remat``): ``'none'`` keeps every activation for the
backward pass; ``'dots_saveable'`` keeps only matmul outputs of each block and
recomputes the rest (norms, GELU, softmax); ``'full'`` keeps only each block's
input and recomputes the whole block. Gradients are unchanged (to float32
rounding); the activations kept for the backward pass shrink (``full`` keeps a
small fraction of ``none``'s) for a longer backward pass (large batches,
ViT-L/H). XLA CPU's compiled temporary memory does not move with it, so it is
for accelerators. Both counts at MAE's decoder shape:
``benchmarks/results/design_choices_cpu.md``, "remat". See ``remat_block``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from prmim_jax.models import features, relative_position, tokens
from prmim_jax.models.attention import Attention, attention_implementation, device_compute_capability
from prmim_jax.models.layers import (
    FlatDense,
    MlpBlock,
    layer_norm,
    logical,
    residual_dtype,
    uniform_init,
    xavier_uniform,
)

REMAT_POLICIES = ("none", "dots_saveable", "full")

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


def backbone_config(variant: str = "B/16", **keys) -> ml_collections.ConfigDict:
    """The keys every ViT model section starts with (MAE's, SimMIM's, LocalMIM's, TEC's, the classifier's), with
    ``keys`` added or changed: ``variant`` ('Ti'|'S'|'B'|'L'|'H' '/' patch); ``width``, ``depth``,
    ``num_heads``, ``patch_size`` (None: the variant's), ``mlp_ratio``, ``image_size`` (an int or ``(h, w)``),
    ``channels``, ``dtype`` (the compute dtype: ``float32`` or ``bfloat16``, parameters stay float32),
    ``attention_impl`` (``attention.attention_implementation``), ``remat`` (``remat_block``)."""
    config = ml_collections.ConfigDict(
        dict(
            variant=variant,
            # None: the variant's. Typed placeholders, so --config.model.patch_size=4 etc. can override them.
            width=config_dict.placeholder(int),
            depth=config_dict.placeholder(int),
            num_heads=config_dict.placeholder(int),
            patch_size=config_dict.placeholder(int),
            mlp_ratio=4.0,
            image_size=224,
            channels=3,
            dtype="float32",
            attention_impl=config_dict.placeholder(str),  # None / 'auto', 'xla', 'cudnn'
            remat="none",  # 'none', 'dots_saveable', 'full'
        )
    )
    config.update(keys)
    return config


def check_patch_multiple(image_size: int, patch_size: int) -> None:
    """``ValueError`` naming the nearest sizes unless ``patch_size`` divides ``image_size``."""
    if image_size % patch_size:
        lower, upper = image_size // patch_size * patch_size, (image_size // patch_size + 1) * patch_size
        raise ValueError(f"{image_size} is not a multiple of the patch size {patch_size}; use {lower} or {upper}.")


def as_pair(image_size) -> tuple[int, int]:
    """An image size given as an int (square) or an ``(h, w)`` pair -> ``(h, w)``."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def backbone_fields(config, *other_head_dims: int) -> dict:
    """A model section's ``VitFields`` and its ``dtype``, ``attention_impl`` and ``remat`` (``backbone_config``'s
    keys), checked: the sizes (``encoder_size``), a dtype of float32 or bfloat16, and an ``attention_impl`` and
    ``remat`` that can run here for the encoder's heads and ``other_head_dims`` (a decoder's). ``ValueError``
    naming the fix otherwise."""
    size = encoder_size(config)
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={config.dtype!r}: choose 'float32' or 'bfloat16' (params stay float32).")
    remat = config.get("remat", "none")
    head_dims = (size.width // size.num_heads, *other_head_dims)
    check_model_options(jnp.dtype(config.dtype), head_dims, config.get("attention_impl"), remat)
    return dict(
        patch_size=size.patch_size,
        image_size=as_pair(config.image_size),
        channels=config.channels,
        width=size.width,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_dim=int(size.width * config.mlp_ratio),
        dtype=jnp.dtype(config.dtype),
        attention_impl=config.get("attention_impl"),
        remat=remat,
    )


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
    image_size = as_pair(config.image_size)
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


def check_model_options(dtype, head_dims: tuple[int, ...], attention_impl: str | None, remat: str) -> None:
    """Raise ``ValueError`` (naming the fix) for an ``attention_impl`` / ``remat`` that cannot run, before compiling.

    ``head_dims``: the head width of every attention stack of the model (MAE:
    encoder and decoder).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES}.")
    backend = jax.default_backend()
    capability = device_compute_capability() if attention_impl == "cudnn" else None
    for head_dim in head_dims:
        attention_implementation(dtype, head_dim, backend, attention_impl, capability)


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` as used by MAE): ``[B, T, D] -> [B, T, D]``.

    ``drop_path`` > 0 drops each residual branch for a whole example with that
    probability while training (stochastic depth), scaling kept ones by
    ``1 / (1 - drop_path)``; it needs the ``'dropout'`` rng unless ``deterministic``.

    ``layer_scale_init`` (CaiT / BEiT layer scale, as SimMIM's ViT uses): when
    set, each residual branch is multiplied by a learned per-channel vector
    (``layer_scale_attn``, ``layer_scale_mlp`` ``[D]``, the official
    ``gamma_1`` / ``gamma_2``) that starts at this value; ``None`` adds no
    parameter. ``attention_bias`` is ``Attention``'s ``bias``. ``relative_position_grid`` (SimMIM's fine-tuning):
    the block owns a relative position table ``relative_position_bias [R, heads]`` (zeros; BEiT's rows for the
    cls token plus grid tokens on this grid, ``models.relative_position``) whose bias is added to its logits.
    """

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    drop_path: float = 0.0
    layer_scale_init: float | None = None
    relative_position_grid: tuple[int, int] | None = None

    def layer_scale(self, name: str, branch):
        if self.layer_scale_init is None:
            return branch
        gamma = self.param(name, logical(nn.initializers.constant(self.layer_scale_init), "embed"), (branch.shape[-1],))
        return branch * gamma.astype(self.dtype)

    @nn.compact
    def __call__(self, x, deterministic: bool = True, attention_bias=None):
        # One keep/drop decision per example: broadcast over tokens and width.
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=deterministic or not self.drop_path)
        if self.relative_position_grid is not None:
            table = self.param(
                "relative_position_bias",
                logical(nn.initializers.zeros, None, "heads"),
                (relative_position.relative_position_bias_size(self.relative_position_grid), self.num_heads),
            )
            own = relative_position.relative_bias(table.astype(self.dtype), self.relative_position_grid, None)
            attention_bias = own if attention_bias is None else attention_bias + own
        attended = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
            layer_norm(self.dtype, "norm1")(x), attention_bias
        )
        x = x + drop(self.layer_scale("layer_scale_attn", attended))
        mlp_out = MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x))
        x = x + drop(self.layer_scale("layer_scale_mlp", mlp_out))
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


class Transformer(nn.Module):
    """``depth`` blocks, then a final LayerNorm when ``final_norm``: ``[B, T, D] -> [B, T, D]``.

    Block ``i`` drops its branches with ``drop_path_rate * i / (depth - 1)``
    (MAE's linear rule). ``frozen_blocks = k`` stops gradients below block
    ``k``: the embeddings and the first ``k`` blocks get none (partial
    fine-tuning and linear probing skip their backward pass).
    ``layer_scale_init`` and ``relative_position_grid`` (a table in every block) are ``Block``'s;
    ``attention_bias`` (``[heads, T, T]`` or ``[B, heads, T, T]``) is added to every block's attention
    logits, one array shared by all blocks (SimMIM's shared relative position bias).
    The blocks carry the residual stream in ``residual_dtype(dtype)`` (float32
    under bfloat16) and are rematerialised by ``remat`` (``remat_block``).

    ``taps`` (block indices counted from 0): when not None, the call returns
    ``(output, tapped)``, ``tapped`` the residual stream after each of those
    blocks in the order given, before any norm (frameworks that read
    intermediate blocks: LocalMIM's levels, MFF's fusion).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    final_norm: bool = True
    drop_path_rate: float = 0.0
    frozen_blocks: int = 0
    layer_scale_init: float | None = None
    remat: str = "none"
    taps: tuple[int, ...] | None = None
    relative_position_grid: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True, attention_bias=None):
        x = x.astype(residual_dtype(self.dtype))
        block_class = remat_block(self.remat)
        if self.taps is not None and not all(0 <= i < self.depth for i in self.taps):
            raise ValueError(f"taps={self.taps} must be block indices in [0, {self.depth}).")
        tapped = {}
        for i in range(self.depth):
            if i == self.frozen_blocks and i:
                x = jax.lax.stop_gradient(x)
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            block = block_class(
                self.num_heads,
                self.mlp_dim,
                self.dtype,
                self.attention_impl,
                rate,
                layer_scale_init=self.layer_scale_init,
                relative_position_grid=self.relative_position_grid,
                name=f"block_{i}",
            )
            x = block(x, deterministic, attention_bias)
            x = residual_boundary(x)
            tapped[i] = x
        if self.frozen_blocks >= self.depth:
            x = jax.lax.stop_gradient(x)
        out = layer_norm(self.dtype, "norm")(x) if self.final_norm else x
        return out if self.taps is None else (out, tuple(tapped[i] for i in self.taps))


# ``deterministic`` (argument 2, counting the module as 0) decides drop path at trace time.
_REMAT_BLOCKS = {
    "none": Block,
    "dots_saveable": nn.remat(Block, static_argnums=(2,), policy=jax.checkpoint_policies.dots_saveable),
    "full": nn.remat(Block, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable),
}


def remat_block(remat: str) -> type[Block]:
    """``Block``, rematerialised by policy ``remat`` (one of ``REMAT_POLICIES``).

    ``'none'``: plain ``Block``. ``'dots_saveable'``: ``nn.remat`` keeping
    the outputs of the block's matmuls (``jax.checkpoint_policies.dots_saveable``,
    the attention logits included) and recomputing norms, GELU and softmax in
    the backward pass. ``'full'``: keeping nothing but the block's input and
    recomputing the block. Parameter names and values are those of ``Block``.
    """
    if remat not in _REMAT_BLOCKS:
        raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES}.")
    return _REMAT_BLOCKS[remat]


@jax.custom_vjp
def residual_boundary(x: jax.Array) -> jax.Array:
    """The identity on the residual stream between two blocks; on XLA CPU its gradient is stored once.

    Why: the gradient of the residual stream is a chain of additions through
    every block's backward pass (each LayerNorm adds its input gradient).
    XLA CPU's fusion duplicates cheap elementwise producers into every
    consumer, so each block's weight-gradient transposes recomputed the whole
    chain from the loss down to that block, reading the saved activations of
    all later blocks in transposed order: at ViT-B/16 (MAE, batch 8) these
    fusions took a third of the train step, growing with depth squared. A
    conditional is an op XLA never fuses across, so passing the gradient
    through one (both branches the identity) makes XLA compute it once per
    block. Off the CPU backend (a GPU conditional would wait for its
    predicate on the host) the gradient passes through untouched.
    """
    return x


def _residual_boundary_fwd(x):
    return x, None


def _residual_boundary_bwd(_, cotangent):
    if jax.default_backend() != "cpu":
        return (cotangent,)
    # The second branch is written ``g * 1`` so that the two branches are not merged (and the
    # conditional removed) before fusion; either is the identity, whatever the predicate.
    predicate = cotangent.reshape(-1)[0] >= 0
    return (jax.lax.cond(predicate, lambda g: g, lambda g: g * 1, cotangent),)


residual_boundary.defvjp(_residual_boundary_fwd, _residual_boundary_bwd)


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


class VitFields(nn.Module):
    """The fields of a model built on a ViT encoder (MAE, SimMIM, LocalMIM, TEC's student), and the token grid
    they make; such a model subclasses this and adds its own."""

    patch_size: int
    image_size: tuple[int, int]
    channels: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32  # the compute dtype (``layers``' precision policy)
    attention_impl: str | None = None  # ``attention.attention_implementation``'s
    remat: str = "none"  # ``remat_block``'s

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def patch_dim(self) -> int:
        """Pixel values per patch, ``p * p * C``."""
        return self.patch_size * self.patch_size * self.channels


def vit_architecture(module: nn.Module, family: str, **more) -> dict:
    """An encoder's ``architecture`` (what a pretrained encoder must share with it for its parameters to load
    into it): its ``family``, the ViT sizes of ``module`` and ``more``."""
    return dict(
        family=family,
        width=module.width,
        depth=module.depth,
        num_heads=module.num_heads,
        mlp_dim=module.mlp_dim,
        patch_size=module.patch_size,
        **more,
    )


def fields_of(module: nn.Module, fields: type[nn.Module]) -> dict:
    """The values ``module`` gives the dataclass fields of ``fields`` (a base class of its), to build another
    module with them."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(fields) if f.name not in ("parent", "name")}


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
    ``drop_path_rate``, ``frozen_blocks`` and ``remat`` are ``Transformer``'s.
    Under bfloat16 the patch embedding's matmul is bfloat16 and the position
    table is added in the float32 residual stream; the output is the final
    LayerNorm's, bfloat16 (float32 residual stream when ``final_norm`` is False).
    ``taps`` is ``Transformer``'s: with it the call returns ``(output, tapped)``.
    ``cls_token_mlp`` (TEC's input adaptor): the cls token passes through an
    MLP (``D -> 4D -> D``, parameters ``cls_token_mlp``) before its position
    is added; its output depends on the parameters only, so an encoder without
    it computes the same with the MLP's output as its cls token
    (``fold_cls_token_mlp``).
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
    remat: str = "none"
    taps: tuple[int, ...] | None = None
    cls_token_mlp: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def tokens_normalized(self) -> bool:
        """Whether ``features``' tokens come out of a final LayerNorm (``models.features``)."""
        return self.final_norm

    @property
    def architecture(self) -> dict:
        """What a pretrained encoder must share with this one for its parameters to load into it."""
        return vit_architecture(self, "vit")

    def features(self, images, deterministic: bool = True) -> features.EncoderOutput:
        """``images [B, H, W, C]`` -> ``EncoderOutput`` of every token (``features.from_sequence``)."""
        return features.from_sequence(self(images, deterministic=deterministic))

    def layer_id(self, names: list[str]) -> int:
        """The layer of the parameter at ``names`` (its path in this encoder) for layer-wise lr decay (``layer_id``);
        with TEC's input adaptor, the cls token and the adaptor are the head's, ``depth + 1`` (sail-sg/TEC
        ``util/lr_decay.py`` L68-77: the cls token's layer -1 reads the last scale, 1)."""
        if self.cls_token_mlp and names[0] in ("cls_token", "cls_token_mlp"):
            return self.depth + 1
        return layer_id(names, self.depth)

    def resized(self, image_size: int) -> Encoder:
        """This encoder for square images of ``image_size``, with a learned position table (fine-tuning's rule:
        ``adapt_pretrained`` resizes a pretrained table to it); ``ValueError`` naming the fix unless the patch
        size divides ``image_size``."""
        check_patch_multiple(image_size, self.patch_size)
        return self.clone(image_size=(image_size, image_size), learned_pos_embedding=True)

    def adapt_pretrained(self, params: dict, pretrained: Encoder) -> dict:
        """The parameters ``params`` of the ``pretrained`` encoder as host numpy arrays for this one: the position
        table resized to this grid (the pretraining's fixed sin-cos table where it had no learned one; none where
        this encoder keeps the fixed table, as TEC's fine-tuning does), and TEC's input adaptor folded into the cls
        token when ``pretrained`` has one and this encoder has not (``fold_cls_token_mlp``: the same cls token, so
        the same outputs)."""
        if pretrained.cls_token_mlp and not self.cls_token_mlp:
            params = fold_cls_token_mlp(params)
        params = jax.tree.map(np.asarray, params)
        if not self.learned_pos_embedding:
            params.pop("pos_embedding", None)
            return params
        table = params.get("pos_embedding")
        if table is None:  # pretrained with the fixed sin-cos table
            table = sincos_2d(pretrained.width, pretrained.grid)
        params["pos_embedding"] = np.asarray(interpolate_pos_embedding(jnp.asarray(table), pretrained.grid, self.grid))
        return params

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
        x = FlatDense(
            self.width,
            dtype=self.dtype,
            kernel_init=logical(xavier_uniform(patch_dim, self.width), "patch", "embed"),
            bias_init=logical(uniform_init(1.0 / math.sqrt(patch_dim)), "embed"),
            name="patch_embed",
        )(patches.astype(self.dtype))
        stream = residual_dtype(self.dtype)
        x = x.astype(stream) + pos_tokens.astype(stream)
        cls_token = self.param(
            "cls_token", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width)
        )
        if self.cls_token_mlp:
            # Per example, so that the MLP's activations carry the batch axis like every other.
            cls_token = jnp.broadcast_to(cls_token, (x.shape[0], 1, self.width))
            cls_token = MlpBlock(4 * self.width, self.dtype, name="cls_token_mlp")(cls_token)
        cls_token = jnp.broadcast_to(cls_token + pos_cls, (x.shape[0], 1, self.width)).astype(stream)
        x = nn.with_logical_constraint(jnp.concatenate([cls_token, x], axis=1), ("batch", "tokens", "embed"))
        blocks = transformer_like(
            self,
            final_norm=self.final_norm,
            drop_path_rate=self.drop_path_rate,
            frozen_blocks=self.frozen_blocks,
            taps=self.taps,
            name="transformer",
        )
        return blocks(x, deterministic)


def fold_cls_token_mlp(encoder_params: dict) -> dict:
    """``Encoder`` parameters with ``cls_token_mlp`` replaced by its output as the ``cls_token`` (float32): the
    parameters of an encoder without the input adaptor that computes the same (the MLP reads the parameters
    only). Parameters without it are returned as they are."""
    if "cls_token_mlp" not in encoder_params:
        return encoder_params
    params = {k: v for k, v in encoder_params.items() if k != "cls_token_mlp"}
    cls_token = jnp.asarray(encoder_params["cls_token"], jnp.float32)
    hidden = encoder_params["cls_token_mlp"]["fc1"]["kernel"].shape[-1]
    mlp = MlpBlock(hidden, parent=None)  # a module of its own, even when called from another module's method
    params["cls_token"] = mlp.apply({"params": encoder_params["cls_token_mlp"]}, cls_token)
    return params


def transformer_like(module: nn.Module, **fields) -> Transformer:
    """The ``Transformer`` of ``module``'s ``depth``, ``num_heads``, ``mlp_dim``, ``dtype``, ``attention_impl`` and
    ``remat``, with ``fields`` (``final_norm``, ``drop_path_rate``, ``name``, ...), made in ``module``'s call."""
    return Transformer(
        module.depth,
        module.num_heads,
        module.mlp_dim,
        module.dtype,
        module.attention_impl,
        **(dict(remat=module.remat) | fields),
    )


def layer_id(names: list[str], depth: int) -> int:
    """A ViT parameter's layer for layer-wise lr decay, from its path below the encoder: 0 the embeddings (patch
    embedding, cls token, position table), ``i + 1`` block ``i``, ``depth + 1`` the final norm (MAE's rule)."""
    block = next((n for n in names if n.startswith("block_")), None)
    if block is not None:
        return int(block.removeprefix("block_")) + 1
    return depth + 1 if "transformer" in names else 0


def encoder_like(model: nn.Module, **overrides) -> Encoder:
    """The ``Encoder`` with ``model``'s ViT fields (``patch_size``, ``image_size``, ``width``, ``depth``,
    ``num_heads``, ``mlp_dim``, ``dtype``, ``attention_impl``, ``remat``): a masked model's encoder as a module of
    its own, whose parameters are the model's ``params['encoder']``; ``overrides``: ``Encoder`` fields to change
    (MFF's pretraining encoder: no final norm, taps)."""
    return Encoder(
        model.patch_size,
        model.image_size,
        model.width,
        model.depth,
        model.num_heads,
        model.mlp_dim,
        model.dtype,
        model.attention_impl,
        remat=model.remat,
        **overrides,
    )


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
