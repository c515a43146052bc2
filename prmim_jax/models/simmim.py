"""SimMIM (Xie et al., CVPR 2022): one ViT encoder over every kept token, a linear pixel head, L1 on masked pixels.

SimMIM has no decoder. Its encoder sees the whole token grid, the masked
tokens replaced by one learned mask token, and a 1x1 convolution to
``p * p * C`` channels followed by a pixel shuffle turns every output token
back into its ``p x p`` patch. The loss is the L1 distance on the masked
pixels. The token ids of ``prmim_jax.masking`` (SimMIM's unit masks:
``TokenLayout(mask_unit=...)``) select the three variants of the paper's
Table 4 with one model:

- SimMIM: nothing thrown; the encoder's sequence is cls, the visible tokens'
  patch embeddings, and the mask token at every masked ("decoded") position.
- partial reconstruction: the thrown masked tokens are left out of the
  encoder's sequence (the paper: "we throw a subset of masked tokens to reduce
  the sequence length of the encoder") and get no loss.
- PR-MIM: as partial, then ``aggregator`` (``prmim_jax.models.aggregate``)
  reconstructs the thrown tokens' features from the encoder's outputs of the
  visible and decoded tokens, and the same head predicts their pixels.

The sequence is ``[cls, visible, decoded]``, not the grid order of the
official code: attention does not see order, the position embedding is
gathered by id, and the relative position bias is gathered by id for every
pair of tokens, so each token computes what it computes in the official
grid-order sequence (``tests/test_simmim.py`` checks it against transformers'
``ViTForMaskedImageModeling``, which is SimMIM's ViT head and loss).

The official ViT-B recipe (microsoft/SimMIM ``configs/vit_base__800ep``):
no absolute position embedding, one relative position bias table shared by
all blocks, layer scale 0.1, drop path 0.1, final LayerNorm, q and v biases
(our key projection has a bias too, initialised to zero; a key bias adds the
same value to every logit of a query, so softmax removes it and it never gets
a gradient), truncated-normal initialisation (``official_init``).

Head layout. ``Conv2d(D, p * p * C, 1)`` then ``PixelShuffle(p)`` gives pixel
``(i, j)`` of channel ``c`` of a token from conv output channel
``c * p * p + i * p + j``: a per-token linear map whose outputs are ordered
``(c, i, j)``. Our head is that linear map with its outputs ordered as
``vit.patchify``'s ``(i, j, c)``, so predictions compare with
``patchify(images)`` directly; ``prmim_jax.interop.hf_simmim`` permutes the
official kernel's rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prmim_jax.models import features as features_lib
from prmim_jax.models import layers, relative_position, swin, tokens, vit

RELATIVE_POSITION_BIASES = ("none", "shared", "per_block")
POSITION_EMBEDDINGS = ("none", "learned", "sincos")
# SimMIM's loss: sum(|x - x_rec| * mask) / (mask.sum() + 1e-5) / in_chans, mask counting pixels.
LOSS_EPS = 1e-5
INIT_STD = 0.02


class SimMIMOutput(NamedTuple):
    features: jax.Array  # [B, 1 + N_vis + N_dec, D] encoder output after its final LayerNorm: cls, visible, decoded
    pred_decoded: jax.Array  # [B, N_dec, P] float32 pixels of the decoded (mask-token) positions
    pred_thrown: jax.Array | None  # [B, N_thr, P] float32 with an aggregator (PR-MIM); None otherwise
    pred_visible: jax.Array | None = None  # [B, N_vis, P] float32, only when asked for


def truncated_normal(std: float = INIT_STD) -> nn.initializers.Initializer:
    """SimMIM's ViT init, ``trunc_normal_(t, std=std, a=-std, b=std)``: N(0, std) cut at one standard deviation.

    Not ``jax.nn.initializers.truncated_normal``, which rescales to keep the
    standard deviation at ``std``; timm's does not (the result's std is 0.54 std).
    """

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)

    return init


class SimMIMFields(vit.VitFields):
    """``vit.VitFields`` and SimMIM's own, which its encoder and the whole model share: ``layer_scale_init``,
    ``relative_position_bias``, ``position_embedding``, ``drop_path_rate`` (``SimMIMEncoder``'s docstring)."""

    layer_scale_init: float | None = 0.1
    relative_position_bias: str = "shared"
    position_embedding: str = "none"
    drop_path_rate: float = 0.0


class SimMIMEncoder(SimMIMFields):
    """SimMIM's ViT: patch embedding, mask token, optional position embedding and shared relative bias, blocks.

    ``images [B, H, W, C]``, ``ids_visible [B, N_vis]``, ``ids_decoded [B, N_dec]``
    (int32, the ids of ``prmim_jax.masking``) -> ``[B, 1 + N_vis + N_dec, width]``
    after the final LayerNorm: cls, the visible tokens' patch embeddings, the
    mask token at each decoded position, in that order; every token also gets
    its position's absolute embedding (``position_embedding``) and the
    relative position bias of its grid position (``relative_position_bias``).
    Tokens in neither set (thrown) are absent. ``ids_visible = None`` encodes
    every token in grid order without masking (evaluation, fine-tuning):
    ``[B, 1 + N, width]``.

    ``position_embedding``: ``'none'`` (SimMIM's ViT-B), ``'learned'``
    (``pos_embedding [1 + N, width]``, cls row first, as transformers' ViT) or
    ``'sincos'`` (MAE's fixed table). ``relative_position_bias``: ``'none'`` or
    ``'shared'`` (one ``relative_position_bias [R, heads]`` table, BEiT's
    index, added to every block's logits: pretraining) or ``'per_block'`` (a
    table in every block, ``block_<i>/relative_position_bias``: SimMIM's
    fine-tuning, every token only). ``layer_scale_init``, ``drop_path_rate``,
    ``frozen_blocks`` and ``remat`` are ``vit.Transformer``'s; ``final_norm``
    False (SimMIM's fine-tuning: mean pooling with its own norm) leaves the last
    block's output as it is. Under bfloat16 the embeddings are added in the
    float32 residual stream and the output is the final LayerNorm's, bfloat16
    (``layers``' precision policy).
    """

    final_norm: bool = True
    frozen_blocks: int = 0

    @property
    def tokens_normalized(self) -> bool:
        """Whether ``features``' tokens come out of a final LayerNorm (``models.features``)."""
        return self.final_norm

    @property
    def architecture(self) -> dict:
        """What a pretrained encoder must share with this one for its parameters to load into it."""
        return vit.vit_architecture(
            self,
            "simmim_vit",
            layer_scale=self.layer_scale_init is not None,
            relative_position_bias=self.relative_position_bias != "none",  # shared or per block: adapt_pretrained
            position_embedding=self.position_embedding,
        )

    def layer_id(self, names: list[str]) -> int:
        """The layer of the parameter at ``names`` (its path in this encoder) for layer-wise lr decay: ``vit.layer_id``
        (a block's own relative table is its block's), and a shared relative table with the head, ``depth + 1``
        (microsoft/SimMIM ``optimizer.py`` ``get_vit_layer``: ``rel_pos_bias`` falls through to the last layer)."""
        if names[0] == "relative_position_bias":
            return self.depth + 1
        return vit.layer_id(names, self.depth)

    def resized(self, image_size: int) -> SimMIMEncoder:
        """This encoder for square images of ``image_size`` (``adapt_pretrained`` resizes its tables);
        ``ValueError`` naming the fix unless the patch size divides ``image_size``."""
        vit.check_patch_multiple(image_size, self.patch_size)
        return self.clone(image_size=(image_size, image_size))

    def adapt_pretrained(self, params: dict, pretrained: SimMIMEncoder) -> dict:
        """The parameters ``params`` of the ``pretrained`` encoder as host numpy arrays for this one, at this grid:
        a learned position table resized bicubically (``vit.interpolate_pos_embedding``, cls row kept), the
        relative table's ``(2H - 1) x (2W - 1)`` offsets resized bicubically (BEiT's and SimMIM's rule,
        ``swin.resize_relative_position_table``) with its three cls rows kept, and a shared table copied into every
        block's where this encoder has one per block (SimMIM's fine-tuning); a sin-cos table is the module's."""
        params = jax.tree.map(np.asarray, params)
        if "pos_embedding" in params:
            table = vit.interpolate_pos_embedding(jnp.asarray(params["pos_embedding"]), pretrained.grid, self.grid)
            params["pos_embedding"] = np.asarray(table)

        def resize(table):
            offsets = swin.resize_relative_position_table(table[:-3], self.grid)
            return np.concatenate([offsets, table[-3:]])

        blocks = params.get("transformer", {})
        for name, block in blocks.items():
            if "relative_position_bias" in block:
                blocks[name] = dict(block) | {"relative_position_bias": resize(block["relative_position_bias"])}
        if "relative_position_bias" in params:
            table = resize(params["relative_position_bias"])
            if self.relative_position_bias != "per_block":
                return params | {"relative_position_bias": table}
            # SimMIM's fine-tuning starts every block's table from the shared one (its utils.remap_pretrained_keys_vit).
            del params["relative_position_bias"]
            params["transformer"] = dict(blocks) | {
                f"block_{i}": dict(blocks[f"block_{i}"]) | {"relative_position_bias": table.copy()}
                for i in range(self.depth)
            }
        return params

    def features(self, images, deterministic: bool = True) -> features_lib.EncoderOutput:
        """``images [B, H, W, C]`` -> ``EncoderOutput`` of every token, no mask token (``features.from_sequence``)."""
        return features_lib.from_sequence(self(images, deterministic=deterministic))

    @nn.compact
    def __call__(self, images, ids_visible=None, ids_decoded=None, deterministic: bool = True):
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            raise ValueError(f"images are {images.shape[1:3]}; the model was built for {self.image_size}.")
        if ids_visible is None and ids_decoded is not None:
            raise ValueError("ids_decoded needs ids_visible: give both (masked pretraining) or neither (every token).")
        batch = images.shape[0]
        patches = vit.patchify(images, self.patch_size)
        if ids_visible is not None:
            # Only the visible patches are embedded: the official code embeds all and overwrites the masked ones.
            patches = tokens.take(patches, ids_visible)
        x = layers.FlatDense(
            self.width,
            dtype=self.dtype,
            kernel_init=layers.logical(truncated_normal(), "patch", "embed"),
            bias_init=layers.logical(nn.initializers.zeros, "embed"),
            name="patch_embed",
        )(patches.astype(self.dtype))
        stream = layers.residual_dtype(self.dtype)  # float32 under bfloat16: vit's precision policy
        x = x.astype(stream)
        ids = None
        if ids_visible is not None:
            ids = ids_visible
            if ids_decoded is not None:
                mask_token = self.param(
                    "mask_token", layers.logical(truncated_normal(), None, None, "embed"), (1, 1, self.width)
                )
                masked = jnp.broadcast_to(mask_token, (batch, ids_decoded.shape[1], self.width)).astype(stream)
                x = jnp.concatenate([x, masked], axis=1)
                ids = jnp.concatenate([ids_visible, ids_decoded], axis=1)
        cls_token = self.param("cls_token", layers.logical(truncated_normal(), None, None, "embed"), (1, 1, self.width))
        cls_token = jnp.broadcast_to(cls_token, (batch, 1, self.width))
        position = self.position_table()
        if position is not None:
            position_tokens = jnp.broadcast_to(position[1:], (batch, *position[1:].shape))
            if ids is not None:
                position_tokens = tokens.take(position_tokens, ids)
            x = x + position_tokens.astype(stream)
            cls_token = cls_token + position[:1]
        x = jnp.concatenate([cls_token.astype(stream), x], axis=1)
        x = nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
        per_block = self.relative_position_bias == "per_block"
        if per_block and ids is not None:
            raise ValueError(
                "relative_position_bias='per_block' is SimMIM's fine-tuning layout (every token); pretrain with 'shared'."
            )
        blocks = vit.transformer_like(
            self,
            final_norm=self.final_norm,
            drop_path_rate=self.drop_path_rate,
            layer_scale_init=self.layer_scale_init,
            frozen_blocks=self.frozen_blocks,
            relative_position_grid=self.grid if per_block else None,
            name="transformer",
        )
        return blocks(x, deterministic, self.attention_bias(ids))

    def position_table(self):
        """``[1 + N, width] float32`` absolute embedding (cls row first), or None without one."""
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding={self.position_embedding!r}; choose one of {POSITION_EMBEDDINGS}.")
        if self.position_embedding == "none":
            return None
        shape = (1 + self.grid[0] * self.grid[1], self.width)
        if self.position_embedding == "sincos":
            return jnp.asarray(vit.sincos_2d(self.width, self.grid))
        return self.param("pos_embedding", layers.logical(truncated_normal(), None, "embed"), shape)

    def attention_bias(self, ids):
        """The shared relative position bias of the sequence ``[cls, ids]`` (``relative_bias``), or None."""
        if self.relative_position_bias not in RELATIVE_POSITION_BIASES:
            raise ValueError(
                f"relative_position_bias={self.relative_position_bias!r}; choose one of {RELATIVE_POSITION_BIASES}."
            )
        if self.relative_position_bias != "shared":
            return None  # none, or per block (the blocks' own)
        table = self.param(
            "relative_position_bias",
            layers.logical(nn.initializers.zeros, None, "heads"),
            (relative_position.relative_position_bias_size(self.grid), self.num_heads),
        )
        return relative_position.relative_bias(
            table.astype(self.dtype), self.grid, ids
        )  # cast once, not in every block


class SimMIM(SimMIMFields):
    """SimMIM's encoder and pixel head, with optional progressive reconstruction of thrown tokens.

    ``images [B, H, W, C]``, ``ids_visible [B, N_vis]``, ``ids_decoded [B, N_dec]``,
    ``ids_thrown [B, N_thr]`` (int32, ``prmim_jax.masking``'s convention) ->
    ``SimMIMOutput``. The thrown tokens never enter the encoder. With
    ``aggregator`` (a module mapping ``(features [B, M, D], ids_present [B, M],
    ids_thrown [B, T]) -> [B, T, D]``, e.g. ``aggregate.build_aggregator(...)``;
    its parameters are ``params['aggregator']``) the encoder's outputs of the
    visible and decoded tokens give the thrown tokens' features and the head
    predicts their pixels too (PR-MIM); without it the thrown ids are ignored
    (SimMIM, partial reconstruction).

    ``deterministic=False`` turns on drop path (``drop_path_rate``), which then
    needs the ``'dropout'`` rng. Parameters: ``encoder`` (``SimMIMEncoder``),
    ``head`` (``kernel [D, p * p * C]`` in ``patchify``'s order, ``bias``) and
    ``aggregator``.
    """

    aggregator: nn.Module | None = None

    def setup(self):
        self.encoder = encoder_of(self)
        # The official head is a PyTorch Conv2d left at its default init: U(+-1/sqrt(fan_in)), fan_in = D.
        # It is float32 under any dtype (vit's precision policy): its output is the loss's input.
        bound = 1.0 / math.sqrt(self.width)
        self.head = layers.FlatDense(
            self.patch_dim,
            dtype=jnp.float32,
            kernel_init=layers.logical(layers.uniform_init(bound), "embed", "patch"),
            bias_init=layers.logical(layers.uniform_init(bound), "patch"),
        )

    def predict_pixels(self, features):
        """SimMIM's head: ``[B, T, D] -> [B, T, p * p * C] float32`` in ``patchify``'s ``(i, j, c)`` order."""
        return self.head(features.astype(jnp.float32))

    def __call__(
        self,
        images,
        ids_visible,
        ids_decoded,
        ids_thrown=None,
        *,
        predict_visible: bool = False,
        deterministic: bool = True,
    ) -> SimMIMOutput:
        if images.shape[-1] != self.channels:
            raise ValueError(f"images have {images.shape[-1]} channels; the model was built for {self.channels}.")
        features = self.encoder(images, ids_visible, ids_decoded, deterministic)
        outputs = features[:, 1:]  # the cls token predicts nothing
        num_visible = ids_visible.shape[1]
        pred_decoded = self.predict_pixels(outputs[:, num_visible:])
        pred_thrown = None
        if self.aggregator is not None:
            if ids_thrown is None:
                ids_thrown = jnp.zeros((ids_visible.shape[0], 0), jnp.int32)
            ids_present = jnp.concatenate([ids_visible, ids_decoded], axis=1)
            pred_thrown = self.predict_pixels(self.aggregator(outputs, ids_present, ids_thrown))
        pred_visible = self.predict_pixels(outputs[:, :num_visible]) if predict_visible else None
        return SimMIMOutput(features, pred_decoded, pred_thrown, pred_visible)


def encoder_of(model: SimMIM) -> SimMIMEncoder:
    """``model``'s encoder as a module of its own (parameters ``params['encoder']``), for evaluation.

    ``encoder.apply({'params': params['encoder']}, images)`` -> ``[B, 1 + N, D]``:
    every token, grid order, no mask token. Drop path stays at ``model``'s
    rate but is off unless ``deterministic=False``.
    """
    return SimMIMEncoder(**vit.fields_of(model, SimMIMFields))


def simmim_loss(
    images: jax.Array,
    output: SimMIMOutput,
    ids_decoded: jax.Array,
    ids_thrown: jax.Array | None,
    patch_size: int,
    thrown_weight: float = 1.0,
) -> jax.Array:
    """SimMIM's loss, a float32 scalar: L1 over the masked pixels that get a prediction, per pixel and channel.

    The official ``(|x - x_rec| * mask).sum() / (mask.sum() + 1e-5) / in_chans``
    with ``mask [B, 1, H, W]`` marking masked pixels (broadcast over the
    channels, so ``mask.sum()`` counts pixels, and dividing by ``in_chans``
    makes it a mean over pixel-channels). Targets are ``images`` themselves
    (SimMIM normalises images, not patches). Decoded tokens always count;
    thrown tokens count when ``output`` predicts them (PR-MIM), each weighing
    ``thrown_weight`` as much as a decoded one, and not at all otherwise
    (partial reconstruction).
    """
    targets = vit.patchify(images.astype(jnp.float32), patch_size)
    total = jnp.sum(jnp.abs(output.pred_decoded - tokens.take(targets, ids_decoded)))
    masked_tokens = float(ids_decoded.size)
    if output.pred_thrown is not None and ids_thrown is not None and ids_thrown.shape[1]:
        total = total + thrown_weight * jnp.sum(jnp.abs(output.pred_thrown - tokens.take(targets, ids_thrown)))
        masked_tokens += thrown_weight * ids_thrown.size
    masked_pixels = masked_tokens * patch_size * patch_size
    return total / (masked_pixels + LOSS_EPS) / images.shape[-1]


def official_init(params, rng: jax.Array):
    """``params`` with the encoder's block kernels drawn as SimMIM's ViT draws them.

    ``vit.Transformer`` initialises its linears as MAE does (xavier-uniform);
    SimMIM's ViT draws every linear weight from ``truncated_normal(0.02)`` and
    then divides block ``i``'s attention output and ``fc2`` weights by
    ``sqrt(2 (i + 1))`` (BEiT's ``fix_init_weight``). The rest of ``SimMIM``
    already starts as the official model does (embeddings and tokens truncated
    normal, zero biases, LayerNorm 1 / 0, layer scale, zero relative bias,
    PyTorch's default init for the head). Works on boxed (logically
    partitioned) or plain parameters and keeps their structure, so it can run
    inside the jitted, sharded ``init``.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(rng, len(leaves))
    redrawn = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        names = layers.path_names(path)
        if names[:2] == ["encoder", "transformer"] and names[-1] == "kernel" and names[2].startswith("block_"):
            block = int(names[2].removeprefix("block_"))
            leaf = truncated_normal()(key, leaf.shape, leaf.dtype)
            if names[-2] in ("out", "fc2"):
                leaf = leaf / math.sqrt(2.0 * (block + 1))
        redrawn.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, redrawn)


def model_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section of a SimMIM experiment config, the official ViT-B/16 recipe's values:
    ``vit.backbone_config``'s keys and ``layer_scale_init`` (0.1), ``relative_position_bias`` (``'shared'``),
    ``position_embedding`` (``'none'``), ``drop_path_rate`` (0.1).

    The masking (32-pixel units, ratio 0.6) belongs to the method section
    (``masking.TokenLayout(mask_unit=32 // patch_size)``).
    """
    config = vit.backbone_config(
        variant, layer_scale_init=0.1, relative_position_bias="shared", position_embedding="none", drop_path_rate=0.1
    )
    config.update(overrides)
    return config


def build_simmim(config: ml_collections.ConfigDict, aggregator: nn.Module | None = None) -> SimMIM:
    """A ``SimMIM`` from a ``model_config``-shaped config (and the PR-MIM aggregator, if any).

    Raises ``ValueError`` naming the fix on sizes that cannot tile the image,
    unknown position or bias modes, a non-positive layer scale, a drop path
    rate outside [0, 1), an unknown dtype, or an ``attention_impl`` / ``remat`` that cannot run here.
    """
    if config.relative_position_bias == "per_block":
        raise ValueError(
            "relative_position_bias='per_block' is SimMIM's fine-tuning layout; pretrain with 'shared' (a fine-tune "
            "copies the shared table into every block)."
        )
    return SimMIM(**_simmim_fields(config), aggregator=aggregator)


def build_encoder(config: ml_collections.ConfigDict, **options) -> SimMIMEncoder:
    """A ``SimMIMEncoder`` from a ``model_config``-shaped config (a classifier's: ``classifier.simmim_classifier_config``)
    with ``options`` (``final_norm``, ``frozen_blocks``, ...); ``ValueError`` as ``build_simmim``."""
    return SimMIMEncoder(**(_simmim_fields(config) | options))


def _simmim_fields(config: ml_collections.ConfigDict) -> dict:
    """``SimMIMFields`` of a model section, checked (``build_simmim``'s errors)."""
    if config.position_embedding not in POSITION_EMBEDDINGS:
        raise ValueError(
            f"position_embedding={config.position_embedding!r}: choose one of {POSITION_EMBEDDINGS} "
            "('none' is SimMIM's ViT-B, which relies on the relative position bias)."
        )
    if config.relative_position_bias not in RELATIVE_POSITION_BIASES:
        raise ValueError(
            f"relative_position_bias={config.relative_position_bias!r}: choose one of {RELATIVE_POSITION_BIASES}."
        )
    if config.position_embedding == "none" and config.relative_position_bias == "none":
        raise ValueError(
            "position_embedding='none' with relative_position_bias='none' leaves the encoder no way to tell "
            "positions apart; set relative_position_bias='shared' (SimMIM's ViT-B) or a position embedding."
        )
    if config.layer_scale_init is not None and not config.layer_scale_init > 0:
        raise ValueError(f"layer_scale_init={config.layer_scale_init} must be positive, or None for no layer scale.")
    if not 0.0 <= config.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={config.drop_path_rate} must lie in [0, 1).")
    return dict(
        **vit.backbone_fields(config),
        layer_scale_init=config.layer_scale_init,
        relative_position_bias=config.relative_position_bias,
        position_embedding=config.position_embedding,
        drop_path_rate=config.drop_path_rate,
    )
