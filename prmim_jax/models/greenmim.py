"""GreenMIM (Huang et al., NeurIPS 2022; LayneH/GreenMIM): a Swin encoder that reads only the visible tokens,
MAE's decoder on the grid of mask units, and the partial / PR-MIM variants on that grid.

**Mask units.** Masks are drawn on the last stage's tokens: units of ``patch_size * 2^(S-1)`` pixels (32 at
patch 4 with four stages, a 7x7 unit grid at 224; ``unit_grid``). A visible unit brings a whole
``2^(S-1-s)``-sided block of tokens to stage ``s``, so patch merging never needs a token of a masked unit.

**Encoder** (``VisibleSwin``). The visible tokens are kept as ``[B, U, s, s, D]``: ``U`` visible units, each
an ``s x s`` block of tokens (``s = 2^(S-1-stage)``). It has the dense ``swin.SwinTransformer``'s parameters
(names and shapes), so a GreenMIM encoder fine-tunes, evaluates and exports as a Swin.

- Attention (``VisibleWindows``): each block attends over all of an image's visible tokens at once, with an
  additive mask that keeps a query to the keys of its own window (shifted in odd blocks) and, in shifted
  blocks, of its own region (the official ``-100`` between regions), plus the relative position bias of every
  pair. That is the dense Swin's window attention restricted to the visible tokens (tested: with nothing
  masked it is the dense Swin). **Static shapes**: every image has the same number of visible units wherever
  they lie, so per-image masks compile once. GreenMIM shares one mask across the batch and packs the windows
  into groups of equal size (its dynamic-programming grouping) to cut the attention pairs; we keep MAE's
  per-image masks and attend over all ``T`` visible tokens of a stage, ``T^2`` pairs per head instead of the
  grouping's ``~T * w^2``. At 224 with 12 visible units that is 768 tokens in stage 1 (attention then costs
  as much as the block's linear layers there) and 192 / 48 / 12 later, where it is cheap
  (``benchmarks/results/cost_greenmim_cpu.md`` has the counts).
- Patch merging: each unit's block ``[s, s] -> [s/2, s/2]`` with the Swin's ``PatchMerging``.

**Decoder**: MAE's (``mae.Decoder`` without a cls token) on the unit grid, then MAE's pixel head predicting
each unit's ``(unit px)^2 C`` pixels; ``aggregation_kernel > 0`` adds PR-MIM's aggregation of the decoder
outputs on the unit grid for the thrown units.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from prmim_jax.models import layers, swin, tokens, vit
from prmim_jax.models import mae as mae_lib

# Logits between tokens of different windows: their softmax weight is exactly 0 in float32, as when the
# dense Swin never pairs them.
OTHER_WINDOW = -1e9


def unit_grid(image_size: tuple[int, int], patch_size: int, num_stages: int) -> tuple[int, int]:
    """``(rows, cols)`` of mask units: the last stage's token grid (units of ``patch_size * 2^(S-1)`` pixels)."""
    unit = patch_size * 2 ** (num_stages - 1)
    return (image_size[0] // unit, image_size[1] // unit)


def unit_token_coords(ids_units: jax.Array, units: tuple[int, int], side: int) -> jax.Array:
    """``ids_units [B, U]`` (unit ids, row-major on the ``units`` grid) -> ``[B, U, side, side, 2] int32``: the
    ``(row, col)`` of each unit's tokens on a stage grid where a unit is ``side x side`` tokens."""
    unit_rows, unit_cols = jnp.divmod(ids_units.astype(jnp.int32), units[1])
    offsets = jnp.arange(side, dtype=jnp.int32)
    rows = unit_rows[:, :, None, None] * side + offsets[:, None]
    cols = unit_cols[:, :, None, None] * side + offsets[None, :]
    return jnp.stack(jnp.broadcast_arrays(rows, cols), axis=-1)


def _region(position: jax.Array, length: int, window: int, shift: int) -> jax.Array:
    """The official shifted-window region (0, 1, 2) of a position on the cyclically shifted axis."""
    return (position >= length - window).astype(jnp.int32) + (position >= length - shift).astype(jnp.int32)


@flax.struct.dataclass
class VisibleWindows:
    """``SwinBlock``'s grouping (``swin.ShiftedWindows``' protocol) for the visible tokens of a stage.

    ``coords [B, T, 2] int32``: each visible token's ``(row, col)`` on the stage ``grid``. All ``T`` tokens
    form one group (``partition: [B, T, D] -> [B, 1, T, D]``); ``attention_mask() -> [B, 1, T, T]`` keeps
    each query to its own window (after the cyclic ``shift``) and region; ``relative_index() -> [B, 1, T,
    T] int32`` is every pair's row of the relative position table.
    """

    coords: jax.Array
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)
    shift: int = flax.struct.field(pytree_node=False, default=0)

    def partition(self, x: jax.Array) -> jax.Array:
        return x[:, None]

    def merge(self, groups: jax.Array) -> jax.Array:
        return groups[:, 0]

    def _shifted(self) -> tuple[jax.Array, jax.Array]:
        """Rows and columns ``[B, T]`` on the grid rolled by ``-shift``, where the windows are cut."""
        return (self.coords[..., 0] - self.shift) % self.grid[0], (self.coords[..., 1] - self.shift) % self.grid[1]

    def attention_mask(self) -> jax.Array:
        rows, cols = self._shifted()
        window = (rows // self.window) * (self.grid[1] // self.window) + cols // self.window
        same_window = window[:, :, None] == window[:, None, :]
        mask = jnp.where(same_window, 0.0, OTHER_WINDOW)
        if self.shift:
            region = _region(rows, self.grid[0], self.window, self.shift) * 3
            region = region + _region(cols, self.grid[1], self.window, self.shift)
            apart = same_window & (region[:, :, None] != region[:, None, :])
            mask = jnp.where(apart, swin.MASK_VALUE, mask)
        return mask[:, None].astype(jnp.float32)

    def relative_index(self) -> jax.Array:
        rows, cols = self._shifted()
        reach = self.window - 1
        d_rows = jnp.clip(rows[:, :, None] - rows[:, None, :], -reach, reach) + reach
        d_cols = jnp.clip(cols[:, :, None] - cols[:, None, :], -reach, reach) + reach
        return (d_rows * (2 * self.window - 1) + d_cols)[:, None].astype(jnp.int32)


def swin_fields(model: swin.SwinTransformer) -> dict:
    """The ``swin.SwinTransformer`` fields of ``model`` (a dense or a visible-unit Swin), to build the other."""
    names = (f.name for f in dataclasses.fields(swin.SwinTransformer) if f.init and f.name not in ("parent", "name"))
    return {name: getattr(model, name) for name in names}


class VisibleSwin(swin.SwinTransformer):
    """``swin.SwinTransformer`` over the visible mask units only (module docstring); its fields are the dense
    Swin's (``num_classes`` stays 0: no head in pretraining).

    ``images [B, H, W, C]`` (normalised), ``ids_visible [B, U]`` (unit ids, row-major on ``unit_grid``) ->
    ``[B, U, D_last]``, each visible unit's last-stage token after the final LayerNorm, in the order of
    ``ids_visible``. Parameters are the dense Swin's with the same fields.
    """

    def dense(self) -> swin.SwinTransformer:
        """The dense Swin with these fields and parameters (evaluation, fine-tuning, export)."""
        return swin.SwinTransformer(**swin_fields(self), parent=None)  # a module of its own, not a child

    @property
    def unit_grid(self) -> tuple[int, int]:
        return unit_grid(tuple(self.image_size), self.patch_size, len(self.depths))

    @nn.compact
    def __call__(self, images, ids_visible, deterministic: bool = True):
        stages = self.stages
        batch, units = ids_visible.shape
        side = 2 ** (len(stages) - 1)  # a unit's side in stage-0 tokens
        coords = unit_token_coords(ids_visible, self.unit_grid, side)
        token_ids = coords[..., 0] * stages[0].grid[1] + coords[..., 1]
        patches = tokens.take(vit.patchify(images, self.patch_size), token_ids.reshape(batch, -1))
        x = swin.embed_patches(patches, self.width, self.dtype)
        x = x.reshape(batch, units, side, side, self.width)
        for s, (layout, stage) in enumerate(zip(stages, swin.stage_modules(self), strict=True)):
            stage_side = side >> s
            coords = unit_token_coords(ids_visible, self.unit_grid, stage_side).reshape(batch, -1, 2)
            x = stage(
                x.reshape(batch, -1, x.shape[-1]),
                deterministic,
                windows_of=lambda shift, coords=coords, layout=layout: VisibleWindows(
                    coords, layout.grid, layout.window, shift
                ),
                blocks_shape=(units, stage_side, stage_side),
            )
        x = swin.final_norm(x, self.dtype)
        return x.reshape(batch, units, x.shape[-1])


class GreenMIM(nn.Module):
    """Encoder (``VisibleSwin``), MAE's decoder on the unit grid, optional aggregation, MAE's pixel head.

    ``images [B, H, W, C]`` and unit ids (``prmim_jax.masking`` on ``unit_grid``) -> ``mae.MAEOutput``
    (``latent [B, U_vis, D_last]``, predictions ``[B, ·, unit^2 C]`` float32). With ``aggregation_kernel = 0``
    the thrown ids are ignored (GreenMIM, partial); with ``k > 0`` a ``k x k`` aggregation of the decoder
    outputs on the unit grid gives the thrown units' features (PR-MIM).
    """

    encoder: VisibleSwin
    decoder_width: int = 512
    decoder_depth: int = 1
    decoder_num_heads: int = 16
    decoder_mlp_dim: int = 2048
    aggregation_kernel: int = 0
    aggregator: str = "dwconv"

    @property
    def grid(self) -> tuple[int, int]:
        """The unit grid: the token layout masks and the decoder work on."""
        return self.encoder.unit_grid

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.encoder.image_size)

    @property
    def channels(self) -> int:
        return self.encoder.channels

    @property
    def patch_size(self) -> int:
        """A unit's side in pixels (the decoder's 'patch')."""
        return self.encoder.patch_size * 2 ** (len(self.encoder.depths) - 1)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.encoder.channels

    def setup(self):
        encoder = self.encoder
        self.decoder = mae_lib.Decoder(
            self.grid,
            self.decoder_width,
            self.decoder_depth,
            self.decoder_num_heads,
            self.decoder_mlp_dim,
            encoder.dtype,
            encoder.attention_impl,
            encoder.remat,
            cls_token=False,
        )
        self.decoder_norm = layers.layer_norm(jnp.float32)
        self.pixel_head = layers.dense(self.patch_dim, self.decoder_width, ("embed", "patch"), jnp.float32, "pred")
        if self.aggregation_kernel:
            self.aggregation = mae_lib.decoder_aggregation(self.decoder, self.aggregator, self.aggregation_kernel)

    def predict_pixels(self, features):
        """MAE's head: ``[B, T, decoder_width] -> [B, T, unit^2 C] float32``."""
        return self.pixel_head(self.decoder_norm(features.astype(jnp.float32)))

    def __call__(
        self, images, ids_visible, ids_decoded, ids_thrown=None, *, predict_visible: bool = False
    ) -> mae_lib.MAEOutput:
        latent = self.encoder(images, ids_visible)
        features = self.decoder(latent, ids_visible, ids_decoded)
        predictions = mae_lib.pixel_predictions(self, features, ids_visible, ids_decoded, ids_thrown, predict_visible)
        return mae_lib.MAEOutput(latent, *predictions)


INITS = ("xavier", "swin")  # model.init: GreenMIM's xavier-uniform linears, or the Swin's trunc-normal(0.02)


def xavier_init(params, rng: jax.Array):
    """``params`` with the Swin encoder's linear kernels drawn as GreenMIM draws them: xavier-uniform with the fans
    of the PyTorch weight (LayneH/GreenMIM ``modeling/base_green_models.py``: ``self.apply(self._init_weights)``
    reaches the encoder too, over the Swin's own trunc-normal(0.02); the fused ``qkv`` is one ``[3D, D]``
    matrix there, so q, k and v use those fans), the patch embedding's too (``initialize_weights``: the Conv2d
    weights xavier-uniform as ``[out, in * p * p]``, its bias left at PyTorch's default, as ``models.swin``
    draws it). Linear biases stay zero, LayerNorms 1 / 0, the relative position tables trunc-normal(0.02). Works
    on boxed or plain parameters and keeps their structure, as ``models.simmim.official_init``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(rng, len(leaves))
    redrawn = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        names = layers.path_names(path)
        if names[0] == "encoder" and names[-1] == "kernel":
            if names[-2] in ("query", "key", "value"):  # [D, heads, kv] of the fused [3D, D] qkv
                fans = (leaf.shape[0], 3 * leaf.shape[0])
            elif names[-2] == "out":  # [heads, kv, D]
                fans = (leaf.shape[0] * leaf.shape[1], leaf.shape[2])
            else:
                fans = leaf.shape
            leaf = layers.xavier_uniform(*fans)(key, leaf.shape, leaf.dtype)
        redrawn.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, redrawn)


def model_config(variant: str = "B", **overrides) -> ml_collections.ConfigDict:
    """The model section: ``swin.model_config``'s keys (GreenMIM's Swin-B at 224, drop path 0 in pretraining)
    and MAE's decoder keys at GreenMIM's decoder (width 512, depth 1, 16 heads)."""
    config = swin.model_config(variant, drop_path_rate=0.0)
    config.update(mae_lib.decoder_keys(width=512, depth=1, num_heads=16))
    config.init = "xavier"  # GreenMIM's (xavier_init); 'swin': the Swin's own trunc-normal(0.02)
    config.update(overrides)
    return config


def build_greenmim(config: ml_collections.ConfigDict) -> GreenMIM:
    """A ``GreenMIM`` from a ``model_config``-shaped config; ``ValueError`` naming the fix on impossible sizes."""
    dense = swin.build_swin(config)
    mae_lib.check_decoder(config)
    if config.get("init", "swin") not in INITS:
        raise ValueError(f"model.init={config.init!r}; choose one of {INITS} (GreenMIM's is 'xavier').")
    encoder = VisibleSwin(**swin_fields(dense))
    kernel = config.get("aggregation_kernel", 0)
    units = encoder.unit_grid
    if kernel and (kernel % 2 == 0 or kernel > min(units)):
        raise ValueError(
            f"aggregation_kernel={kernel} must be odd and fit the {units[0]}x{units[1]} grid of mask units; "
            "use a smaller odd kernel."
        )
    return GreenMIM(
        encoder,
        config.decoder_width,
        config.decoder_depth,
        config.decoder_num_heads,
        int(config.decoder_width * config.decoder_mlp_ratio),
        kernel,
        config.get("aggregator", "dwconv"),
    )
