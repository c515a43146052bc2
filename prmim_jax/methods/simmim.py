"""The SimMIM family: SimMIM, SimMIM + partial reconstruction, SimMIM + PR-MIM (``reconstruction`` picks).

SimMIM (Xie et al., 2022) masks 32-pixel units (a 7x7 unit grid at 224 with
patch 16) at ratio 0.6, runs one ViT over every token with the masked ones
replaced by a learned mask token, and predicts each masked patch's pixels with
a linear head (1x1 convolution + pixel shuffle), L1 loss on masked pixels
(``models.simmim``). With PR-MIM's keys (``methods.throwing``):

- ``partial``: the thrown masked tokens are dropped from the encoder's
  sequence (the paper's Sec. 4: "we throw a subset of masked tokens to reduce
  the sequence length of the encoder") and get no loss;
- ``progressive``: the aggregator appended after the encoder reconstructs the
  thrown tokens' features from the visible and decoded tokens' outputs, and the
  same head predicts their pixels.

Throwing works on tokens, not on 32-pixel units (``throw_granularity='token'``):
unit throwing leaves 2x2 holes that a small window covers less well
(``prmim_jax.masking``'s "Why tokens by default", counted in
``benchmarks/results/samplers_cpu.md``), and the paper throws "a subset of
masked tokens". ``'unit'`` is there to compare. A batch is ``images [B, H, W, C]`` and the token sets
``ids_visible / ids_decoded / ids_thrown`` (for plain SimMIM every masked
token is "decoded": it enters the encoder as the mask token).
"""

from __future__ import annotations

import jax
import ml_collections

from prmim_jax import masking
from prmim_jax.methods import Registration, Variables, throwing
from prmim_jax.models import simmim as simmim_lib


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain SimMIM unless overridden (official ViT masking: 32-pixel units, ratio 0.6);
    ``reconstruction='progressive'`` is SimMIM + PR-MIM at the paper's rho_d = 0.3 (Table 4)."""
    reconstruction = overrides.pop("reconstruction", "full")
    full = reconstruction == "full"
    keys = throwing.throwing_config(reconstruction, mask_ratio=0.6, throw_ratio=0.0 if full else 0.3)
    keys |= dict(name="simmim", mask_patch_size=32, throw_granularity="token")
    return ml_collections.ConfigDict(keys | overrides)


class MaskedImageModeling(throwing.ThrowingMethod):
    """``Method`` of the module docstring; ``model`` is the ``SimMIM`` module it trains."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        config.method = section = throwing.complete_section(config.method, default_config)
        probe = simmim_lib.build_simmim(config.model)
        if section.mask_patch_size % probe.patch_size:
            raise ValueError(
                f"method.mask_patch_size={section.mask_patch_size} must be a multiple of the patch size "
                f"{probe.patch_size}; SimMIM masks units of whole patches (32 px at patch 16)."
            )
        self.throwing = throwing.Throwing.from_config(
            section,
            probe.grid,
            mask_unit=section.mask_patch_size // probe.patch_size,
            throw_granularity=section.throw_granularity,
        )
        aggregator = self.throwing.aggregator_module(
            probe.dtype, probe.width, num_heads=probe.num_heads, mlp_ratio=probe.mlp_dim / probe.width
        )
        self.model = simmim_lib.build_simmim(config.model, aggregator=aggregator)

    def init(self, rng, batch) -> Variables:
        init_rng, redraw_rng = jax.random.split(rng)
        params = self.model.init(init_rng, batch["images"], *throwing.batch_ids(batch))["params"]
        return Variables(simmim_lib.official_init(params, redraw_rng))

    def objective(self, params, images, ids: masking.TokenIds, rng=None) -> jax.Array:
        """The float32 loss of ``images [B, H, W, C]`` with token sets ``ids``; drop path on when ``rng`` is given."""
        output = self.model.apply(
            {"params": params},
            images,
            ids.visible,
            ids.decoded,
            ids.thrown,
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        return simmim_lib.simmim_loss(
            images, output, ids.decoded, ids.thrown, self.model.patch_size, self.throwing.thrown_loss_weight
        )

    def loss(self, variables: Variables, batch: dict, rng):
        loss = self.objective(variables.params, batch["images"], throwing.batch_ids(batch), rng)
        return loss, {}, variables.batch_stats

    def encoder(self, params=None):
        return simmim_lib.encoder_of(self.model), None if params is None else params["encoder"]

    def predict(self, params, images, ids: masking.TokenIds) -> simmim_lib.SimMIMOutput:
        return self.model.apply({"params": params}, images, ids.visible, ids.decoded, ids.thrown)


REGISTRATION = Registration(MaskedImageModeling, default_config, model=lambda given: simmim_lib.model_config())
