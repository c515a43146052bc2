"""MFF (multi-level feature fusion, Liu et al., 2023; mmpretrain's ``MFF``): MAE whose decoder reads a learned
mixture of the encoder's blocks, with MAE's partial and PR-MIM variants (``reconstruction`` picks).

The encoder's output is replaced by ``norm(sum_k softmax(w)_k f_k)`` over
the outputs of the ``fused_blocks`` (each through its own linear projection)
and of the last block (as is): ``models.mff``. Everything else is MAE
(``methods.mae``): the decoder sees the visible latents and mask tokens at the
decoded positions, a linear head predicts norm-pix targets, and the loss is
the mean squared error over the predicted masked tokens. With PR-MIM's keys
(``methods.throwing``) the decoder skips the thrown tokens (``partial``) and
the aggregator reconstructs them from its outputs (``progressive``), exactly
as for MAE. Config section::

    config.method = mff.default_config()                                # MFF
    config.method = mff.default_config(reconstruction="progressive")    # MFF + PR-MIM: furthest, rho_d 0.5

``fused_blocks`` counts blocks from 1; the default, ``(1, 3, 5, 7, 9)`` (and
block 12, always), is mmpretrain's 800-epoch ViT-B config (``out_indices=[0,
2, 4, 6, 8, 11]``). The encoder left for evaluation is the plain ViT (the
fusion's norm as its final norm, on the last block), as mmpretrain evaluates
it. Training logs the softmax-normalised weights as ``fusion_weight_<block>``.
"""

from __future__ import annotations

import ml_collections

from prmim_jax.methods import Registration, mae, throwing
from prmim_jax.models import mff as mff_lib

OFFICIAL_FUSED_BLOCKS = (1, 3, 5, 7, 9)  # ViT-B, counted from 1; block 12 is fused as is


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain MFF unless overridden; ``reconstruction='progressive'`` is MFF + PR-MIM
    (furthest sampling, rho_d 0.5: Table 4), ``'partial'`` partial reconstruction."""
    reconstruction = overrides.pop("reconstruction", "full")
    keys = throwing.throwing_config(reconstruction) | dict(
        name="mff", norm_pix_loss=True, fused_blocks=OFFICIAL_FUSED_BLOCKS
    )
    return ml_collections.ConfigDict(keys | overrides)


class MultiLevelFeatureFusion(mae.MaskedAutoencoding):
    """``Method`` of the module docstring; ``model`` is a ``MaskedAutoencoder`` with ``fused_blocks``."""

    section_defaults = staticmethod(default_config)

    def model_options(self, section: ml_collections.ConfigDict) -> dict:
        return {"fused_blocks": tuple(section.fused_blocks)}

    def loss(self, variables, batch: dict, rng):
        loss, metrics, batch_stats = super().loss(variables, batch, rng)
        weights = mff_lib.fusion_weights(variables.params["fusion"])
        blocks = (*self.model.fused_blocks, self.model.depth)
        metrics = metrics | {f"fusion_weight_{block}": weights[k] for k, block in enumerate(blocks)}
        return loss, metrics, batch_stats

    def encoder(self, params=None):
        """The plain ViT encoder (``vit.encoder_like``); its final norm is the fusion's ``norm``."""
        module, _ = super().encoder()
        if params is None:
            return module, None
        encoder = dict(params["encoder"])
        encoder["transformer"] = dict(encoder["transformer"]) | {"norm": params["fusion"]["norm"]}
        return module, encoder


REGISTRATION = Registration(MultiLevelFeatureFusion, default_config, model=mae.REGISTRATION.model)
