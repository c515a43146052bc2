"""The masked autoencoder (encoder, decoder, pixel head), progressive reconstruction, and the pixel objective.

The model takes the token ids of ``prmim_jax.masking`` (visible / decoded /
thrown), so one model serves the three methods of ``prmim_jax.methods``:
MAE (nothing thrown), partial reconstruction (the decoder never sees the
thrown tokens and nothing predicts them) and PR-MIM (a depth-wise aggregation
reconstructs the thrown tokens from the decoder's outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from prmim_jax.models import aggregate, layers, mff, tokens, vit

NORM_PIX_EPS = 1e-6


class MAEOutput(NamedTuple):
    latent: jax.Array  # [B, 1 + N_vis, D] encoder output, cls first
    pred_decoded: jax.Array  # [B, N_dec, P] float32 pixels of the decoded tokens
    pred_thrown: jax.Array | None  # [B, N_thr, P] float32; None without progressive reconstruction
    pred_visible: jax.Array | None = None  # [B, N_vis, P] float32, only when asked for


class Decoder(nn.Module):
    """MAE's decoder blocks: visible latents plus mask tokens at the decoded positions.

    ``latent [B, 1 + N_vis, D_enc]``, ``ids_visible [B, N_vis]``,
    ``ids_decoded [B, N_dec]`` (masked tokens; under VideoMAE V2's running-cell
    decoder also visible ones, which then appear twice: the latent and a mask
    token) -> ``[B, 1 + N_vis + N_dec, width]``, the last
    block's output (MAE's ``decoder_norm`` belongs to the pixel head, which
    progressive reconstruction applies after its aggregation), in the order
    cls, visible, decoded; with ``cls_token=False`` (GreenMIM's decoder) the latent
    has no cls token and neither has the output. The sequence is not
    unshuffled to grid order as in the official code: attention does not see
    order and positions are added by id, so the outputs are the same. The
    output is the residual stream, float32 under bfloat16 (``vit``'s precision
    policy); ``remat`` is ``vit.Transformer``'s.
    """

    grid: tuple[int, int]
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    cls_token: bool = True

    @nn.compact
    def __call__(self, latent, ids_visible, ids_decoded):
        x = decoder_input(self, latent, ids_visible, ids_decoded, self.cls_token)
        return vit.transformer_like(self, final_norm=False, name="transformer")(x)


def decoder_input(module: nn.Module, latent, ids_visible, ids_decoded, cls_token: bool = True) -> jax.Array:
    """MAE's decoder input, made in ``module``'s compact call (its parameters ``embed`` and ``mask_token``;
    ``module`` has ``width``, ``grid``, ``dtype``): ``latent [B, (1 +) N_vis, D]`` embedded to ``width``, the
    mask token at each of ``ids_decoded [B, N_dec]``, and the fixed sin-cos positions of ``ids_visible`` and
    ``ids_decoded`` (and of the cls row, with ``cls_token``) added -> ``[B, (1 +) N_vis + N_dec, width]`` in the
    residual stream's dtype, order (cls,) visible, decoded."""
    batch, width = latent.shape[0], module.width
    x = layers.dense(width, latent.shape[-1], ("embed", "decoder_embed"), module.dtype, "embed")(latent)
    mask_token = module.param(
        "mask_token", layers.logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, width)
    )
    stream = layers.residual_dtype(module.dtype)
    masked = jnp.broadcast_to(mask_token, (batch, ids_decoded.shape[1], width)).astype(stream)
    x = jnp.concatenate([x.astype(stream), masked], axis=1)
    pos_table = jnp.asarray(vit.sincos_2d(width, module.grid))
    pos_tokens = jnp.broadcast_to(pos_table[1:], (batch, *pos_table[1:].shape))
    pos = tokens.take(pos_tokens, jnp.concatenate([ids_visible, ids_decoded], axis=1))
    if cls_token:
        pos = jnp.concatenate([jnp.broadcast_to(pos_table[:1], (batch, 1, width)), pos], axis=1)
    return nn.with_logical_constraint(x + pos.astype(stream), ("batch", "tokens", "embed"))


class MaskedAutoencoder(vit.VitFields):
    """Encoder, decoder, optional progressive aggregation, and MAE's pixel head (LayerNorm + linear).

    ``images [B, H, W, C]`` and the ids of ``prmim_jax.masking`` -> ``MAEOutput``.
    With ``aggregation_kernel = 0`` the thrown ids are ignored (MAE, partial
    reconstruction); with ``k > 0`` a ``k x k`` depth-wise aggregation of the
    decoder outputs gives the thrown tokens' features and the same head
    predicts their pixels (PR-MIM). With ``fused_blocks`` (block numbers
    counted from 1) the encoder's output is MFF's multi-level fusion of those
    blocks and the last (``models.mff``); the fusion holds the final norm.
    """

    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_dim: int = 2048
    aggregation_kernel: int = 0
    aggregator: str = "dwconv"  # progressive reconstruction's design (models.aggregate.AGGREGATORS)
    fused_blocks: tuple[int, ...] = ()  # MFF: blocks (counted from 1) fused with the last; () for MAE

    def setup(self):
        if self.fused_blocks:
            taps = (*(b - 1 for b in self.fused_blocks), self.depth - 1)  # counted from 0
            self.encoder = vit.encoder_like(self, final_norm=False, taps=taps)
            self.fusion = mff.MultiLevelFusion(self.dtype)
        else:
            self.encoder = vit.encoder_like(self)
        self.decoder = Decoder(
            self.grid,
            self.decoder_width,
            self.decoder_depth,
            self.decoder_num_heads,
            self.decoder_mlp_dim,
            self.dtype,
            self.attention_impl,
            self.remat,
        )
        # The pixel head is float32 under any dtype (``vit``'s precision policy): its output is the loss's input.
        self.decoder_norm = layers.layer_norm(jnp.float32)
        self.pixel_head = layers.dense(self.patch_dim, self.decoder_width, ("embed", "patch"), jnp.float32, "pred")
        if self.aggregation_kernel:
            self.aggregation = decoder_aggregation(self.decoder, self.aggregator, self.aggregation_kernel)

    def predict_pixels(self, features):
        """MAE's head: ``[B, T, decoder_width] -> [B, T, P] float32``."""
        return self.pixel_head(self.decoder_norm(features.astype(jnp.float32)))

    def __call__(
        self, images, ids_visible, ids_decoded, ids_thrown=None, *, predict_visible: bool = False
    ) -> MAEOutput:
        if images.shape[-1] != self.channels:
            raise ValueError(f"images have {images.shape[-1]} channels; the model was built for {self.channels}.")
        latent = self.encode(images, ids_visible)
        features = self.decoder(latent, ids_visible, ids_decoded)[:, 1:]  # the cls token predicts nothing
        return MAEOutput(
            latent, *pixel_predictions(self, features, ids_visible, ids_decoded, ids_thrown, predict_visible)
        )

    def encode(self, images, ids_visible):
        """``[B, 1 + N_vis, width]``: the encoder's output, or MFF's fused blocks with ``fused_blocks``."""
        if not self.fused_blocks:
            return self.encoder(images, ids_visible)
        _, blocks = self.encoder(images, ids_visible)
        return self.fusion(blocks)


def decoder_aggregation(decoder: Decoder, aggregator: str, kernel_size: int) -> nn.Module:
    """Progressive reconstruction's ``aggregator`` (``models.aggregate``) for ``decoder``'s outputs: on its grid,
    with its width, heads, MLP, dtype and attention."""
    return aggregate.build_aggregator(
        aggregator,
        decoder.grid,
        kernel_size,
        decoder.dtype,
        width=decoder.width,
        num_heads=decoder.num_heads,
        mlp_ratio=decoder.mlp_dim / decoder.width,
        attention_impl=decoder.attention_impl,
    )


def pixel_predictions(model, features, ids_visible, ids_decoded, ids_thrown, predict_visible: bool):
    """``(pred_decoded, pred_thrown, pred_visible)`` float32 pixels from the decoder's ``features [B, N_vis +
    N_dec, width]`` (visible first, no cls): the decoded tokens through ``model.predict_pixels``; with
    ``model.aggregation_kernel`` the thrown tokens through ``model.aggregation`` then the same head, else None;
    the visible tokens when asked, else None. ``model``: a module with those members (MAE, GreenMIM)."""
    num_visible = ids_visible.shape[1]
    pred_decoded = model.predict_pixels(features[:, num_visible:])
    pred_thrown = None
    if model.aggregation_kernel:
        if ids_thrown is None:
            ids_thrown = jnp.zeros((ids_visible.shape[0], 0), jnp.int32)
        ids_present = jnp.concatenate([ids_visible, ids_decoded], axis=1)
        pred_thrown = model.predict_pixels(model.aggregation(features, ids_present, ids_thrown))
    pred_visible = model.predict_pixels(features[:, :num_visible]) if predict_visible else None
    return pred_decoded, pred_thrown, pred_visible


def pixel_targets(images: jax.Array, patch_size: int, norm_pix: bool = True) -> jax.Array:
    """``[B, H, W, C] -> [B, N, p * p * C] float32`` reconstruction targets.

    With ``norm_pix`` each patch is normalised by its own mean and unbiased
    variance (``(x - mean) / sqrt(var + 1e-6)``), MAE's ``norm_pix_loss``.
    """
    patches = vit.patchify(images.astype(jnp.float32), patch_size)
    if not norm_pix:
        return patches
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def token_mse(targets: jax.Array, pred: jax.Array, ids: jax.Array) -> jax.Array:
    """Per-token squared error: ``targets [B, N, P]``, ``pred [B, M, P]``, ``ids [B, M]`` -> ``[B, M] float32``."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - tokens.take(targets, ids)), axis=-1)


def reconstruction_loss(
    images: jax.Array,
    output: MAEOutput,
    ids_decoded: jax.Array,
    ids_thrown: jax.Array | None,
    patch_size: int,
    norm_pix: bool = True,
    thrown_weight: float = 1.0,
    decoded_weight: jax.Array | None = None,
) -> jax.Array:
    """Mean squared pixel error over the predicted masked tokens, a float32 scalar.

    Decoded tokens count, each with its ``decoded_weight [B, N_dec]`` (None: 1;
    VideoMAE V2's running-cell decoder: ``masked_weight``, 1 where masked, 0 where
    visible); thrown tokens count when ``output`` predicts them (PR-MIM), each
    with weight ``thrown_weight`` (1: a plain mean over every masked token). The
    mean divides by the batch's summed weights, as VideoMAE V2's ``(loss *
    cal_loss_mask).sum() / cal_loss_mask.sum()``; a batch whose weights sum to 0
    has loss 0. Without thrown predictions and decoded weights this is MAE's
    objective, bit for bit.
    """
    targets = pixel_targets(images, patch_size, norm_pix)
    decoded_mse = token_mse(targets, output.pred_decoded, ids_decoded)
    if decoded_weight is None:
        total, count = jnp.sum(decoded_mse), float(ids_decoded.size)
    else:
        total, count = jnp.sum(decoded_weight * decoded_mse), jnp.sum(decoded_weight)
    if output.pred_thrown is not None and ids_thrown is not None and ids_thrown.shape[1]:
        total = total + thrown_weight * jnp.sum(token_mse(targets, output.pred_thrown, ids_thrown))
        count += thrown_weight * ids_thrown.size
    if decoded_weight is None:
        return total / count
    return total / jnp.where(count > 0, count, 1.0)  # no weight: total is 0 too, and the gradient stays finite


def masked_weight(ids_visible: jax.Array, ids: jax.Array, num_tokens: int) -> jax.Array:
    """``[B, M] float32``: 1 where ``ids [B, M]`` is a masked token, 0 where it is one of ``ids_visible [B, N_vis]``
    (token ids of a grid of ``num_tokens``)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    visible = jnp.zeros((ids.shape[0], num_tokens), jnp.float32).at[rows, ids_visible].set(1.0)
    return 1.0 - jnp.take_along_axis(visible, ids, axis=1)


def model_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section of an experiment config, MAE's defaults: ``vit.backbone_config``'s keys (``variant``
    'Ti'|'S'|'B'|'L'|'H' '/' patch sets the encoder; ``width``, ``depth``, ``num_heads`` or ``patch_size``
    replace the variant's values) and the decoder's: ``decoder_width``, ``decoder_depth``,
    ``decoder_num_heads``, ``decoder_mlp_ratio`` (512 x 8, 16 heads), ``aggregation_kernel`` and ``aggregator``
    (PR-MIM's aggregation, set by the method).
    """
    config = vit.backbone_config(variant, **decoder_keys(width=512, depth=8, num_heads=16))
    config.update(overrides)
    return config


# The fields of a model with MAE's decoder and PR-MIM's aggregation of its outputs (``MaskedAutoencoder``'s,
# ``models.tec.TecStudent``'s), set from the model section's ``decoder_keys``.
DECODER_FIELDS = (
    "decoder_width",
    "decoder_depth",
    "decoder_num_heads",
    "decoder_mlp_dim",
    "aggregation_kernel",
    "aggregator",
)


def decoder_keys(width: int, depth: int, num_heads: int) -> dict:
    """The model-section keys of an MAE decoder (also GreenMIM's), with PR-MIM's aggregation off (the method
    turns it on): ``decoder_width``, ``decoder_depth``, ``decoder_num_heads``, ``decoder_mlp_ratio``,
    ``aggregation_kernel``, ``aggregator``."""
    return dict(
        decoder_width=width,
        decoder_depth=depth,
        decoder_num_heads=num_heads,
        decoder_mlp_ratio=4.0,
        aggregation_kernel=0,
        aggregator="dwconv",
    )


def check_decoder(config: ml_collections.ConfigDict) -> None:
    """``ValueError`` naming the fix unless ``decoder_keys``' width splits into its heads and into the 2-D sin-cos
    table's four quarters."""
    if config.decoder_width % config.decoder_num_heads or config.decoder_width % 4:
        raise ValueError(
            f"decoder_width={config.decoder_width} must be divisible by its number of heads "
            f"({config.decoder_num_heads}) and by 4 (2-D sin-cos table)."
        )


def build_mae(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
    """A ``MaskedAutoencoder`` from ``model_config``-shaped config; raises ``ValueError`` on impossible sizes."""
    size = vit.encoder_size(config)
    check_decoder(config)
    kernel = config.get("aggregation_kernel", 0)
    image_size = vit.as_pair(config.image_size)
    grid = (image_size[0] // size.patch_size, image_size[1] // size.patch_size)
    if kernel and (kernel % 2 == 0 or kernel > min(grid)):
        raise ValueError(
            f"aggregation_kernel={kernel} must be odd and fit the {grid[0]}x{grid[1]} token grid; "
            "use a smaller odd kernel or a larger image / smaller patch."
        )
    return MaskedAutoencoder(
        **vit.backbone_fields(config, config.decoder_width // config.decoder_num_heads),
        decoder_width=config.decoder_width,
        decoder_depth=config.decoder_depth,
        decoder_num_heads=config.decoder_num_heads,
        decoder_mlp_dim=int(config.decoder_width * config.decoder_mlp_ratio),
        aggregation_kernel=config.get("aggregation_kernel", 0),
        aggregator=config.get("aggregator", "dwconv"),
        fused_blocks=mff.check_fused_blocks(config.fused_blocks, size.depth) if config.get("fused_blocks") else (),
    )
