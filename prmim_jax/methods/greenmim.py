"""GreenMIM (Huang et al., NeurIPS 2022; LayneH/GreenMIM) on a Swin, with partial reconstruction and PR-MIM on
the grid of mask units (``reconstruction`` picks). Config section::

    config.model = greenmim_model.model_config("B")                          # Swin-B, window 7, decoder 512x1
    config.method = greenmim.default_config()                                # GreenMIM
    config.method = greenmim.default_config(reconstruction="progressive")    # + PR-MIM: furthest, rho_d 0.5

Masks, thrown sets and samplers work on the unit grid (``models.greenmim.unit_grid``: 7x7 units of 32 pixels
at 224), where GreenMIM's decoder works: 12 of the 49 units visible at ratio 0.75, and with rho_d = 0.5 (a
fraction of all units, as everywhere) 24 of the 37 masked units thrown (Table 5). The loss is MAE's norm-pix MSE per unit (``(32 px)^2 * 3`` values),
over every masked unit the model predicts. The encoder left for evaluation and fine-tuning is the dense
``swin.SwinTransformer`` with the pretrained parameters.
"""

from __future__ import annotations

import jax
import ml_collections

from prmim_jax.methods import Registration, Variables, mae, throwing
from prmim_jax.models import greenmim as greenmim_lib


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain GreenMIM unless overridden (mask ratio 0.75, norm-pix);
    ``reconstruction='progressive'`` is GreenMIM + PR-MIM (furthest sampling, rho_d 0.5: Table 5), ``'partial'``
    partial reconstruction."""
    reconstruction = overrides.pop("reconstruction", "full")
    keys = throwing.throwing_config(reconstruction) | dict(name="greenmim", norm_pix_loss=True)
    return ml_collections.ConfigDict(keys | overrides)


class GreenMaskedAutoencoding(mae.MaskedAutoencoding):
    """``Method`` of ``prmim_jax.methods``; ``model`` is the ``models.greenmim.GreenMIM`` it trains. MAE's
    objective, sampling and pictures on the unit grid (the model's ``grid`` and ``patch_size`` are the units')."""

    section_defaults = staticmethod(default_config)
    build_model = staticmethod(greenmim_lib.build_greenmim)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if self.throwing.sampler == "amt":
            raise ValueError(
                "method.sampler='amt' reads a ViT's cls attention, and a Swin has no cls token; use 'furthest' "
                "(PR-MIM's), 'random_throw' or 'running_cell' with GreenMIM."
            )

    def init(self, rng, batch) -> Variables:
        """MAE's initialisation, with the Swin encoder's linears redrawn as GreenMIM's (``model.init='xavier'``;
        ``'swin'``: the Swin's own, and what configs saved before the key existed used)."""
        variables = super().init(rng, batch)
        if self.config.model.get("init", "swin") != "xavier":
            return variables
        return variables.replace(params=greenmim_lib.xavier_init(variables.params, jax.random.fold_in(rng, 1)))

    def encoder(self, params=None):
        """The dense Swin (``swin.SwinTransformer``) with the visible-token encoder's parameters."""
        return self.model.encoder.dense(), None if params is None else params["encoder"]


REGISTRATION = Registration(GreenMaskedAutoencoding, default_config, model=lambda given: greenmim_lib.model_config())
