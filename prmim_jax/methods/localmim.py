"""The LocalMIM family: LocalMIM, LocalMIM + partial reconstruction, LocalMIM + PR-MIM (``reconstruction`` picks).

LocalMIM (Wang et al., CVPR 2023; Haoqing-Wang/LocalMIM) reconstructs
multi-scale HOG features from several encoder blocks, each through its own
one-block decoder and head (``models.localmim``; targets:
``targets.hog``, computed on the device from the augmented image). With
PR-MIM's keys (``methods.throwing``; the paper's Table 4 uses rho_d = 0.65):

=================  ===================  =====================================================
reconstruction     throw_ratio (rho_d)  what each level's decoder and head reconstruct
=================  ===================  =====================================================
``full``           0                    every masked token (the official model)
``partial``        > 0                  the decoded tokens; thrown positions are zeros in the
                                        heads' grid and get no loss at any scale
``progressive``    >= 0                 the decoded tokens by the decoder, the thrown ones by
                                        the level's aggregator; every masked token is supervised
=================  ===================  =====================================================

Where the aggregation goes: in every level, between its decoder and its
LayerNorm + head, so each head reads a full token grid; the token mask (with
the thrown tokens' weights: 0 for partial, ``thrown_loss_weight`` for PR-MIM)
is carried to each head's scale by repetition (finer) or 2x2 means (coarser).
``models.localmim``'s docstring has the details.

    config.method = localmim.default_config()                                # LocalMIM
    config.method = localmim.default_config(reconstruction="progressive")    # + PR-MIM: furthest, rho_d 0.65

A batch is ``images [B, H, W, C]`` and the token sets ``ids_visible /
ids_decoded / ids_thrown`` of ``prmim_jax.masking``. The targets are HOG, not
pixels, so the method draws no reconstruction pictures. The step's metrics add
``loss_block<b>``, the loss of the level tapping encoder block ``b`` (counted from 1).
"""

from __future__ import annotations

import jax
import ml_collections

from prmim_jax import masking
from prmim_jax.methods import Registration, Variables, throwing
from prmim_jax.models import localmim as localmim_lib
from prmim_jax.models import vit
from prmim_jax.targets import hog


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain LocalMIM unless overridden (MAE's masking at 0.75);
    ``reconstruction='progressive'`` is LocalMIM + PR-MIM at the paper's rho_d = 0.65 (Table 4), furthest sampling."""
    reconstruction = overrides.pop("reconstruction", "full")
    full = reconstruction == "full"
    keys = throwing.throwing_config(reconstruction, throw_ratio=0.0 if full else 0.65)
    keys |= dict(name="localmim")
    return ml_collections.ConfigDict(keys | overrides)


class LocalMultiScaleReconstruction(throwing.ThrowingMethod):
    """``Method`` of the module docstring; ``model`` is the ``models.localmim.LocalMIM`` it trains."""

    reconstructs_pixels = False  # HOG targets: no pixels to draw

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        config.method = section = throwing.complete_section(config.method, default_config)
        probe = localmim_lib.build_localmim(config.model)
        self.throwing = throwing.Throwing.from_config(section, probe.grid)
        progressive = self.throwing.progressive
        self.model = localmim_lib.build_localmim(
            config.model,
            aggregation_kernel=self.throwing.kernel_size if progressive else 0,
            aggregator=self.throwing.aggregator,
        )
        hog.check_cells(self.model.image_size, self.model.hog_cells)

    @property
    def thrown_weight(self) -> float:
        """A thrown token's loss weight: ``thrown_loss_weight`` when PR-MIM reconstructs it, else 0."""
        return self.throwing.thrown_loss_weight if self.throwing.progressive else 0.0

    def init(self, rng, batch) -> Variables:
        return Variables(self.model.init(rng, batch["images"], *throwing.batch_ids(batch))["params"])

    def predict(self, params, images, ids: masking.TokenIds) -> localmim_lib.LocalMIMOutput:
        return self.model.apply({"params": params}, images, ids.visible, ids.decoded, ids.thrown)

    def hog_targets(self, images) -> tuple[jax.Array, ...]:
        """``images [B, H, W, C]`` (normalised) -> each level's HOG ``[B, g_h * s, g_w * s, C * bins] float32``."""
        return hog.multiscale_hog(images, self.model.hog_cells, self.model.hog_bins)

    def objective(self, params, images, ids: masking.TokenIds) -> tuple[jax.Array, list]:
        """``(loss, per-level losses)``, float32, of ``images [B, H, W, C]`` with token sets ``ids``."""
        model = self.model
        weights = localmim_lib.token_weights(ids.decoded, ids.thrown, self.layout.num_tokens, self.thrown_weight)
        output = self.predict(params, images, ids)
        return localmim_lib.multiscale_loss(
            output.predictions, self.hog_targets(images), weights, model.grid, model.scales
        )

    def loss(self, variables: Variables, batch: dict, rng):
        del rng  # the model is deterministic
        loss, levels = self.objective(variables.params, batch["images"], throwing.batch_ids(batch))
        metrics = {f"loss_block{block}": level for block, level in zip(self.model.tap_blocks, levels, strict=True)}
        return loss, metrics, variables.batch_stats

    def encoder(self, params=None):
        return vit.encoder_like(self.model), None if params is None else params["encoder"]


REGISTRATION = Registration(
    LocalMultiScaleReconstruction, default_config, model=lambda given: localmim_lib.model_config()
)
