"""MFF's multi-level feature fusion (Liu et al., "Improving Pixel-based MIM by Reducing Wasted Modeling Capability").

The MAE encoder's output is replaced by a weighted sum of several of its
blocks' outputs, so the pixel decoder also reads low-level features:

    fused = sum_k softmax(w)_k * f_k,   f_k = projection_k(block output k)   (k < K)
                                        f_K = last block's output            (as is)
    latent = norm(fused)

over the fused blocks (ViT-B: blocks 1, 3, 5, 7, 9, counted from 1, then block
12), each block's output being the residual stream before any norm, ``w`` a
learned vector starting at ones (so the first weights are uniform), each
projection a ``D -> D`` linear (xavier-uniform, zero bias, as MAE's linears).
``norm`` is the encoder's final LayerNorm: in pretraining it normalises the
fused features; the encoder left for evaluation is the plain ViT, this same
norm on its last block (mmpretrain's ``MFFViT`` applies its ``norm1`` to the
fused features when masking and to the last block otherwise).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax.models import layers


class MultiLevelFusion(nn.Module):
    """``blocks``: ``K + 1`` arrays ``[B, T, D]`` (the fused blocks' outputs, the last block's last) ->
    ``[B, T, D]``, the normalised fused features in ``dtype``.

    Parameters: ``projection_{k}`` (``k < K``: kernel ``[D, D]``, bias ``[D]``),
    ``weights [K + 1]`` (softmax-normalised in the call), ``norm``.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, blocks):
        *projected, last = blocks
        width = last.shape[-1]
        weights = self.param("weights", layers.logical(nn.initializers.ones, None), (len(blocks),))
        features = [
            layers.dense(width, width, ("embed", None), self.dtype, f"projection_{k}")(x)
            for k, x in enumerate(projected)
        ] + [last]
        weights = jax.nn.softmax(weights.astype(jnp.float32))
        stream = layers.residual_dtype(self.dtype)
        fused = sum(w * f.astype(stream) for w, f in zip(weights, features, strict=True))
        fused = nn.with_logical_constraint(fused, ("batch", "tokens", "embed"))
        return layers.layer_norm(self.dtype, "norm")(fused)


def fusion_weights(params) -> jax.Array:
    """The softmax-normalised fusion weights ``[K + 1] float32`` of a ``MultiLevelFusion``'s ``params``."""
    return jax.nn.softmax(jnp.asarray(params["weights"], jnp.float32))


def check_fused_blocks(fused_blocks, depth: int) -> tuple[int, ...]:
    """``fused_blocks`` (counted from 1) as a tuple; ``ValueError`` naming the fix unless they are increasing
    blocks below the last (the last block is always fused, unprojected)."""
    blocks = tuple(int(b) for b in fused_blocks)
    if not blocks or list(blocks) != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] >= depth:
        raise ValueError(
            f"method.fused_blocks={tuple(fused_blocks)} must be increasing block numbers in [1, {depth - 1}] "
            f"(counted from 1; the last block, {depth}, is always fused as is), e.g. (1, 3, 5, 7, 9) at depth 12."
        )
    return blocks
