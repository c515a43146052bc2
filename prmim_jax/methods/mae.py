"""The MAE family: MAE, MAE + partial reconstruction, MAE + PR-MIM (one module, ``reconstruction`` picks).

=================  ===================  =====================================================
reconstruction     throw_ratio (rho_d)  what is reconstructed
=================  ===================  =====================================================
``full`` (MAE)     0                    every masked token, by the decoder
``partial``        > 0                  only the decoded tokens; thrown tokens get no loss
``progressive``    >= 0                 decoded tokens by the decoder, thrown tokens by the
                                        aggregation of the decoder outputs (PR-MIM)
=================  ===================  =====================================================

The encoder sees the visible tokens; the decoder sees the visible latents and
mask tokens at the decoded positions (never the thrown ones); the loss is the
mean squared error over the predicted masked tokens against norm-pix targets
(``models.mae.reconstruction_loss``).

``running_cell_decoder`` chooses what the ``running_cell`` sampler's decoder
reads: ``'masked'`` (ours, the default) decodes masked tokens only, ``N_dec =
N_mask - N_thr`` like every sampler; ``'videomae'`` is VideoMAE V2's official
decoder masking (``partial`` reconstruction only): mask tokens at every
position the cell keeps, visible ones included, and a loss over the masked
kept positions alone, averaged over the batch's count of them. The thrown-token
accounting of both is in ``prmim_jax.masking`` ("Running cell"). Config section::

    config.method = mae.default_config()                                # MAE
    config.method = mae.default_config(reconstruction="progressive")    # PR-MIM: furthest sampling, rho_d 0.5

(``methods.method_config("prmim")`` / ``("partial")`` give the same sections by
their earlier names.) A batch is ``images [B, H, W, C]`` and the token sets
``ids_visible / ids_decoded / ids_thrown`` of ``prmim_jax.masking``.
"""

from __future__ import annotations

import jax
import ml_collections

from prmim_jax import masking, optim
from prmim_jax.data import schema
from prmim_jax.methods import Registration, Variables, canonical_section, throwing
from prmim_jax.models import mae as mae_lib
from prmim_jax.models import vit


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain MAE unless overridden; ``reconstruction='progressive'`` is PR-MIM (furthest
    sampling, rho_d 0.5 by default), ``'partial'`` partial reconstruction."""
    reconstruction = overrides.pop("reconstruction", "full")
    keys = throwing.throwing_config(reconstruction) | dict(
        name="mae", norm_pix_loss=True, running_cell_decoder="masked"
    )
    return ml_collections.ConfigDict(keys | overrides)


class MaskedAutoencoding(throwing.ThrowingMethod):
    """``Method`` of the module docstring; ``model`` is the ``MaskedAutoencoder`` it trains.

    A framework that is MAE with another encoder subclasses it with its own ``section_defaults`` (its
    ``default_config``), ``model_options`` (model-section keys from its method section; MFF) or
    ``build_model`` (a model with MAE's outputs from a model section; GreenMIM's)."""

    section_defaults = staticmethod(default_config)
    build_model = staticmethod(mae_lib.build_mae)

    def model_options(self, section: ml_collections.ConfigDict) -> dict:
        del section
        return {}

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        config.method = section = throwing.complete_section(config.method, self.section_defaults)
        probe = self.build_model(config.model)  # checks sizes; the grid decides the token layout
        self.throwing = throwing.Throwing.from_config(section, probe.grid)
        model_config = ml_collections.ConfigDict(config.model.to_dict())
        model_config.aggregation_kernel = self.throwing.kernel_size if self.throwing.progressive else 0
        model_config.aggregator = self.throwing.aggregator
        model_config.update(self.model_options(section))
        self.model = self.build_model(model_config)
        self.norm_pix_loss = bool(section.norm_pix_loss)

    def init(self, rng, batch) -> Variables:
        ids = throwing.batch_ids(batch)
        return Variables(self.model.init(rng, batch["images"], *ids)["params"])

    def predict(self, params, images, ids: masking.TokenIds) -> mae_lib.MAEOutput:
        return self.model.apply({"params": params}, images, ids.visible, ids.decoded, ids.thrown)

    def objective(self, params, images, ids: masking.TokenIds) -> jax.Array:
        """The float32 loss of ``images [B, H, W, C]`` with token sets ``ids``; under VideoMAE V2's running-cell
        decoder (``layout.decodes_visible``) the decoded positions count where they are masked."""
        decoded_weight = None
        if self.layout.decodes_visible:
            decoded_weight = mae_lib.masked_weight(ids.visible, ids.decoded, self.layout.num_tokens)
        return mae_lib.reconstruction_loss(
            images,
            self.predict(params, images, ids),
            ids.decoded,
            ids.thrown,
            self.model.patch_size,
            self.norm_pix_loss,
            self.throwing.thrown_loss_weight,
            decoded_weight,
        )

    def loss(self, variables: Variables, batch: dict, rng):
        del rng  # the model is deterministic
        return self.objective(variables.params, batch["images"], throwing.batch_ids(batch)), {}, variables.batch_stats

    def encoder(self, params=None):
        return vit.encoder_like(self.model), None if params is None else params["encoder"]


REGISTRATION = Registration(MaskedAutoencoding, default_config, model=lambda given: mae_lib.model_config())


def from_sections(model_config: ml_collections.ConfigDict, method_section: ml_collections.ConfigDict, **rest):
    """The method of an experiment with these ``model`` and ``method`` sections and default optimizer and data
    (tools, benchmarks and tests that need a method without a whole experiment); ``rest``: more sections."""
    sections = dict(optimizer=optim.optimizer_config(), data=schema.data_config()) | rest
    config = ml_collections.ConfigDict(dict(model=model_config, method=method_section) | sections)
    config.method = canonical_section(config.method)
    return MaskedAutoencoding(config)
