"""TEC (Target-Enhanced Conditional pretraining, Gao et al., sail-sg/TEC): a student predicting a frozen teacher.

Teacher (``teacher_encoder``, ``teacher_targets``): a pretrained ViT (MAE,
DeiT, DINO, iBOT, or one of our runs) on the whole image. Its targets:

- ``features [B, N, Dt]``: the mean of the last ``feature_blocks`` blocks'
  outputs (the residual stream, before the final norm) at the patch tokens;
  the loss normalises them per image and channel over the N tokens
  (``normalize_over_tokens``, unbiased variance, as the official code);
- ``attention [B, 1 + K, Ht, N]`` (optional): the last block's attention
  logits (``q k^T / sqrt(head_dim)``, before the softmax) of the cls query and
  of the K patch queries the cls token attends to most (mean logit over
  heads), over the N patch keys; ``query_ids [B, K]`` names those patches.

Student (``TecStudent``), the official ``TECViT``:

- the MAE encoder over the visible tokens, with the input adaptor
  (``cls_token_mlp``: the cls token through an MLP, ``vit.Encoder``'s option);
- the feature adaptor (``FeatureAdaptor``): every block's output (the last
  one after the final norm) concatenated, a LayerNorm over the ``L * D``
  channels, ``G`` groups of ``L / G`` consecutive blocks each mapped by a
  linear ``(L / G) D -> D`` plus a residual MLP ``D -> 4 Dd -> D``, summed,
  a LayerNorm;
- two decoders sharing their transformer blocks (``decoder_blocks``), each
  with its own embedding and mask token (``feature_input``,
  ``attention_input``): the feature decoder ends in a LayerNorm and a linear
  head to the teacher's width; the attention decoder in a LayerNorm and a
  linear ``Dd -> 2 Dt`` giving queries and keys (``Ht`` heads of ``Dt / Ht``
  channels), whose products, scaled by ``Dt^-1/2`` (the official scale, the
  whole width), are the predicted attention logits of the same queries.

PR-MIM: the decoders see the visible and decoded tokens only. With
``progressive`` reconstruction one aggregator per decoder reconstructs the
thrown tokens from its block outputs (before its norm, as MAE's): the
feature head predicts them, and the attention decoder's queries and keys are
read from a full grid. With ``partial`` reconstruction the attention
decoder's grid has nothing at the thrown positions: the loss leaves out the
thrown keys (on both sides of the cross-entropy) and the thrown queries
(``attention_loss``'s masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prmim_jax.models import aggregate, layers, tokens, vit
from prmim_jax.models import attention as attention_lib
from prmim_jax.models import mae as mae_lib

FEATURE_NORM_EPS = 1e-6
# A logit that takes a key out of a softmax; finite, so that 0 * log p stays 0 (and so does its gradient).
EXCLUDED_LOGIT = -1e9


class TeacherTargets(NamedTuple):
    features: jax.Array  # [B, N, Dt] float32
    attention: jax.Array | None = None  # [B, 1 + K, Ht, N] float32 logits, cls query first
    query_ids: jax.Array | None = None  # [B, K] int32, patches counted from 0 in grid order


class TecOutput(NamedTuple):
    latent: jax.Array  # [B, 1 + N_vis, D] the feature adaptor's output, cls first
    pred_decoded: jax.Array  # [B, N_dec, Dt] float32
    pred_thrown: jax.Array | None  # [B, N_thr, Dt] float32; None without progressive reconstruction
    attention: jax.Array | None  # [B, 1 + K, Ht, N] float32 predicted logits; None without attention targets


def teacher_taps(depth: int, feature_blocks: int, attention: bool) -> tuple[int, ...]:
    """The teacher blocks (counted from 0) whose outputs the targets read: the last ``feature_blocks`` and, for
    attention targets, the one before the last (the last block's input)."""
    taps = set(range(depth - feature_blocks, depth)) | ({depth - 2} if attention else set())
    return tuple(sorted(taps))


def teacher_encoder(size: vit.VitSize, image_size, feature_blocks: int, attention: bool, dtype, attention_impl=None):
    """The teacher: a ViT with a learned position table (pretrained teachers have their own) tapped for the
    targets; ``apply`` gives ``(output, tapped)`` (``vit.Encoder``)."""
    return vit.Encoder(
        size.patch_size,
        tuple(image_size),
        size.width,
        size.depth,
        size.num_heads,
        4 * size.width,
        dtype,
        attention_impl,
        learned_pos_embedding=True,
        taps=teacher_taps(size.depth, feature_blocks, attention),
    )


def attention_logits(block_params: dict, x: jax.Array, num_heads: int, dtype) -> jax.Array:
    """A block's attention logits ``[B, heads, T, T] float32`` (before the softmax) for its input ``x [B, T, D]``.

    Recomputed from the block's ``norm1`` and ``attn/{query,key}`` parameters
    rather than returned by the attention, which never forms them on the
    fused paths."""
    width = x.shape[-1]
    head_dim = width // num_heads
    normed = layers.layer_norm(dtype).apply({"params": block_params["norm1"]}, x)
    project = attention_lib.HeadProjection(num_heads, head_dim, nn.initializers.zeros, dtype)
    query, key = (project.apply({"params": block_params["attn"][n]}, normed) for n in ("query", "key"))
    logits = jnp.einsum("bthk,bshk->bhts", query, key, preferred_element_type=jnp.float32)
    return logits / np.sqrt(head_dim)


def teacher_targets(teacher: vit.Encoder, params, images, feature_blocks: int, top_k: int = 0) -> TeacherTargets:
    """The teacher's targets for ``images [B, H, W, C]`` (the module docstring); ``top_k = 0``: features only."""
    _, tapped = teacher.apply({"params": params}, images)
    blocks = dict(zip(teacher.taps, tapped, strict=True))
    last = teacher.depth - 1
    feature_taps = [blocks[i].astype(jnp.float32) for i in range(last + 1 - feature_blocks, last + 1)]
    features = (sum(feature_taps) / feature_blocks)[:, 1:]
    if not top_k:
        return TeacherTargets(features)
    logits = attention_logits(
        params["transformer"][f"block_{last}"], blocks[last - 1], teacher.num_heads, teacher.dtype
    )
    patch_keys = logits[..., 1:]  # [B, Ht, 1 + N, N]
    _, query_ids = jax.lax.top_k(patch_keys[:, :, 0].mean(axis=1), top_k)  # the cls query's favourite patches
    picked = jnp.take_along_axis(patch_keys[:, :, 1:], query_ids[:, None, :, None], axis=2)  # [B, Ht, K, N]
    rows = jnp.concatenate([patch_keys[:, :, :1], picked], axis=2)
    return TeacherTargets(features, jnp.swapaxes(rows, 1, 2), query_ids.astype(jnp.int32))


def normalize_over_tokens(features: jax.Array) -> jax.Array:
    """``[B, N, C] -> [B, N, C] float32``: each image's channels standardised over its N tokens (unbiased
    variance, ``+ 1e-6``), the official ``forward_loss_feature``'s target."""
    features = features.astype(jnp.float32)
    mean = features.mean(axis=1, keepdims=True)
    var = features.var(axis=1, keepdims=True, ddof=1)
    return (features - mean) / jnp.sqrt(var + FEATURE_NORM_EPS)


def feature_loss(targets, output: TecOutput, ids_decoded, ids_thrown=None, thrown_weight: float = 1.0) -> jax.Array:
    """Mean squared error (over channels) of the predicted masked tokens against ``targets [B, N, Dt]``
    (normalised), averaged over those tokens, thrown ones weighted by ``thrown_weight``: a float32 scalar."""
    total = jnp.sum(mae_lib.token_mse(targets, output.pred_decoded, ids_decoded))
    count = float(ids_decoded.size)
    if output.pred_thrown is not None and ids_thrown is not None and ids_thrown.shape[1]:
        total = total + thrown_weight * jnp.sum(mae_lib.token_mse(targets, output.pred_thrown, ids_thrown))
        count += thrown_weight * ids_thrown.size
    return total / count


def attention_loss(predicted, target, temperature: float, query_valid=None, key_valid=None) -> jax.Array:
    """Cross-entropy of ``softmax(predicted)`` against ``softmax(target / temperature)`` over the keys, averaged
    over queries and heads: a float32 scalar (the official ``forward_loss_att``).

    ``predicted``, ``target``: ``[B, Q, H, N]`` logits. ``key_valid [B, N]`` and
    ``query_valid [B, Q]`` (bool, None: all) leave keys out of both softmaxes
    and queries out of the mean (partial reconstruction's thrown tokens)."""
    predicted, target = predicted.astype(jnp.float32), target.astype(jnp.float32) / temperature
    if key_valid is not None:
        keys = key_valid[:, None, None, :]
        predicted = jnp.where(keys, predicted, EXCLUDED_LOGIT)
        target = jnp.where(keys, target, EXCLUDED_LOGIT)
    cross_entropy = -jnp.sum(jax.nn.softmax(target, axis=-1) * jax.nn.log_softmax(predicted, axis=-1), axis=-1)
    if query_valid is None:
        return cross_entropy.mean()
    weights = jnp.broadcast_to(query_valid[:, :, None], cross_entropy.shape).astype(jnp.float32)
    return jnp.sum(cross_entropy * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class FeatureAdaptor(nn.Module):
    """``blocks``: L arrays ``[B, T, D]`` (every encoder block's output, the last one normalised) ->
    ``[B, T, D]`` in ``dtype``; ``groups`` divides L. Parameters ``norm_before [L D]``,
    ``fuse_{g}`` (``[(L / G) D, D]``), ``mlp_{g}`` (``D -> hidden -> D``), ``norm_after``."""

    groups: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, blocks: Sequence[jax.Array]):
        width = blocks[-1].shape[-1]
        stream = layers.residual_dtype(self.dtype)
        x = jnp.concatenate([b.astype(stream) for b in blocks], axis=-1)
        x = layers.layer_norm(self.dtype, "norm_before")(x)
        fused = 0.0
        for g, chunk in enumerate(jnp.split(x, self.groups, axis=-1)):
            y = layers.dense(width, chunk.shape[-1], ("embed", None), self.dtype, f"fuse_{g}")(chunk).astype(stream)
            y = y + layers.MlpBlock(self.hidden, self.dtype, name=f"mlp_{g}")(y).astype(stream)
            fused = fused + y
        fused = nn.with_logical_constraint(fused, ("batch", "tokens", "embed"))
        return layers.layer_norm(self.dtype, "norm_after")(fused)


class DecoderInput(nn.Module):
    """One TEC decoder's input, as ``models.mae.Decoder``'s: ``latent [B, 1 + N_vis, D]`` embedded to
    ``width``, mask tokens at ``ids_decoded``, positions added -> ``[B, 1 + N_vis + N_dec, width]`` (the
    residual stream's dtype), order cls, visible, decoded."""

    grid: tuple[int, int]
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latent, ids_visible, ids_decoded):
        return mae_lib.decoder_input(self, latent, ids_visible, ids_decoded)


class TecStudent(vit.VitFields):
    """The student of the module docstring. ``images [B, H, W, C]``, the ids of ``prmim_jax.masking`` and the
    teacher's ``query_ids [B, K]`` (None: no attention prediction) -> ``TecOutput``.

    ``aggregation_kernel > 0`` turns on progressive reconstruction with
    ``aggregator`` (``models.aggregate``); ``attention`` builds the
    attention decoder; ``target_width`` / ``target_heads`` are the teacher's."""

    target_width: int = 768  # the teacher's width and heads (a ViT-B's by default)
    target_heads: int = 12
    decoder_width: int = 512
    decoder_depth: int = 2
    decoder_num_heads: int = 16
    decoder_mlp_dim: int = 2048
    adaptor_groups: int = 4
    cls_token_mlp: bool = True
    attention: bool = True
    aggregation_kernel: int = 0
    aggregator: str = "dwconv"

    def setup(self):
        self.encoder = vit.encoder_like(self, taps=tuple(range(self.depth)), cls_token_mlp=self.cls_token_mlp)
        self.adaptor = FeatureAdaptor(self.adaptor_groups, 4 * self.decoder_width, self.dtype)
        self.decoder_blocks = vit.Transformer(
            self.decoder_depth,
            self.decoder_num_heads,
            self.decoder_mlp_dim,
            self.dtype,
            self.attention_impl,
            final_norm=False,
            remat=self.remat,
        )
        self.feature_input = DecoderInput(self.grid, self.decoder_width, self.dtype)
        # The heads are float32 under any dtype (``vit``'s precision policy): their outputs are the losses' inputs.
        self.feature_norm = layers.layer_norm(jnp.float32)
        self.feature_head = layers.dense(
            self.target_width, self.decoder_width, ("embed", None), jnp.float32, "feature_head"
        )
        if self.attention:
            self.attention_input = DecoderInput(self.grid, self.decoder_width, self.dtype)
            self.attention_norm = layers.layer_norm(jnp.float32)
            self.attention_head = layers.dense(
                2 * self.target_width, self.decoder_width, ("embed", None), jnp.float32, "attention_head"
            )
        if self.aggregation_kernel:
            options = dict(
                width=self.decoder_width,
                num_heads=self.decoder_num_heads,
                mlp_ratio=self.decoder_mlp_dim / self.decoder_width,
                attention_impl=self.attention_impl,
            )
            build = aggregate.build_aggregator
            self.feature_aggregation = build(self.aggregator, self.grid, self.aggregation_kernel, self.dtype, **options)
            if self.attention:
                self.attention_aggregation = build(
                    self.aggregator, self.grid, self.aggregation_kernel, self.dtype, **options
                )

    def __call__(self, images, ids_visible, ids_decoded, ids_thrown=None, query_ids=None) -> TecOutput:
        if images.shape[-1] != self.channels:
            raise ValueError(f"images have {images.shape[-1]} channels; the model was built for {self.channels}.")
        normed_last, blocks = self.encoder(images, ids_visible)
        latent = self.adaptor([*blocks[:-1], normed_last])
        if ids_thrown is None:
            ids_thrown = jnp.zeros((ids_visible.shape[0], 0), jnp.int32)
        ids_present = jnp.concatenate([ids_visible, ids_decoded], axis=1)
        num_visible = ids_visible.shape[1]

        features = self.decoder_blocks(self.feature_input(latent, ids_visible, ids_decoded))[:, 1:]
        pred_decoded = self.predict_features(features[:, num_visible:])
        pred_thrown = None
        if self.aggregation_kernel:
            pred_thrown = self.predict_features(self.feature_aggregation(features, ids_present, ids_thrown))
        attention = None
        if self.attention and query_ids is not None:
            attention = self.predict_attention(latent, ids_visible, ids_decoded, ids_thrown, query_ids)
        return TecOutput(latent, pred_decoded, pred_thrown, attention)

    def predict_features(self, x):
        """The feature head: ``[B, T, decoder_width] -> [B, T, target_width] float32``."""
        return self.feature_head(self.feature_norm(x.astype(jnp.float32)))

    def predict_attention(self, latent, ids_visible, ids_decoded, ids_thrown, query_ids):
        """``[B, 1 + K, target_heads, N] float32`` logits of the cls and ``query_ids`` queries over every patch
        key; at thrown positions the keys and queries read the aggregation (progressive) or an empty token."""
        x = self.decoder_blocks(self.attention_input(latent, ids_visible, ids_decoded))
        cls, patches = x[:, :1], x[:, 1:]
        ids = jnp.concatenate([ids_visible, ids_decoded], axis=1)
        if self.aggregation_kernel:
            patches = jnp.concatenate([patches, self.attention_aggregation(patches, ids, ids_thrown)], axis=1)
            ids = jnp.concatenate([ids, ids_thrown], axis=1)
        num_tokens = self.grid[0] * self.grid[1]
        grid = aggregate.scatter_to_grid(patches, ids, num_tokens, patches.dtype)
        sequence = jnp.concatenate([cls.astype(grid.dtype), grid], axis=1)
        query_key = self.attention_head(self.attention_norm(sequence.astype(jnp.float32)))
        batch, length = query_key.shape[:2]
        head_dim = self.target_width // self.target_heads
        query, key = jnp.split(query_key.reshape(batch, length, 2, self.target_heads, head_dim), 2, axis=2)
        query, key = query[:, :, 0], key[:, :, 0]  # [B, 1 + N, heads, head_dim]
        queries = jnp.concatenate([query[:, :1], tokens.take(query[:, 1:], query_ids)], axis=1)
        logits = jnp.einsum("bqhc,bnhc->bqhn", queries, key[:, 1:])
        return logits / np.sqrt(self.target_width)


def model_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section: ``models.mae.model_config``'s keys with TEC's decoder (2 blocks of width 512, 16
    heads) and its adaptors: ``cls_token_mlp`` (the input adaptor) and ``adaptor_groups`` (G; 0 for
    ``depth // 3``, the official)."""
    config = mae_lib.model_config(variant, decoder_depth=2)
    config.update(dict(cls_token_mlp=True, adaptor_groups=0))
    config.update(overrides)
    return config


def build_student(config: ml_collections.ConfigDict, target: vit.VitSize, attention: bool) -> TecStudent:
    """A ``TecStudent`` from a ``model_config``-shaped config and the teacher's size; ``ValueError`` on impossible
    sizes, naming the fix."""
    probe = mae_lib.build_mae(config)  # checks the keys MAE shares (sizes, dtype, attention, aggregation)
    groups = config.get("adaptor_groups") or max(probe.depth // 3, 1)
    if probe.depth % groups:
        raise ValueError(
            f"model.adaptor_groups={groups} must divide the depth {probe.depth} (the feature adaptor maps "
            "groups of consecutive blocks); 0 takes depth // 3, the official."
        )
    return TecStudent(
        **vit.fields_of(probe, vit.VitFields),
        **{name: getattr(probe, name) for name in mae_lib.DECODER_FIELDS},
        target_width=target.width,
        target_heads=target.num_heads,
        adaptor_groups=groups,
        cls_token_mlp=bool(config.get("cls_token_mlp", True)),
        attention=attention,
    )
