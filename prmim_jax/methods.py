"""The pretraining methods and how a config selects them.

=========  ===================  ==========================================================
method     throw_ratio (rho_d)  what is reconstructed
=========  ===================  ==========================================================
``mae``    0                    every masked token, by the decoder (MAE)
``partial``  > 0                only the decoded tokens; thrown tokens get no loss
``prmim``  >= 0                 decoded tokens by the decoder, thrown tokens by the k x k
                                depth-wise aggregation of the decoder outputs (PR-MIM)
=========  ===================  ==========================================================

Any method combines with any sampler of ``prmim_jax.masking`` that can serve
its throwing ratio (``random`` throws nothing). The config section:

    config.method = method_config("prmim", sampler="furthest", throw_ratio=0.5)
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from prmim_jax import masking
from prmim_jax.models import mae as mae_lib

METHODS = ("mae", "partial", "prmim")


def method_config(name: str = "prmim", **overrides) -> ml_collections.ConfigDict:
    """The method section of an experiment config; the paper's defaults (Table 13, Sec. 3)."""
    config = ml_collections.ConfigDict(
        dict(
            name=name,
            sampler="random" if name == "mae" else "furthest",
            mask_ratio=0.75,
            throw_ratio=0.0 if name == "mae" else 0.5,
            kernel_size=7,  # progressive reconstruction's aggregation window (prmim)
            thrown_loss_weight=1.0,  # weight of a thrown token's loss against a decoded one's (prmim)
            norm_pix_loss=True,
        )
    )
    config.update(overrides)
    return config


@dataclasses.dataclass(frozen=True)
class Method:
    """A validated method: token layout, sampler and objective, plus the model it needs."""

    name: str
    sampler: str
    layout: masking.TokenLayout
    kernel_size: int
    thrown_loss_weight: float
    norm_pix_loss: bool

    @property
    def aggregation_kernel(self) -> int:
        return self.kernel_size if self.name == "prmim" else 0

    def sample(self, noise: np.ndarray) -> masking.TokenIds:
        """``noise [B, 2, N]`` (``masking.draw_noise`` per image) -> this method's ``TokenIds``."""
        return masking.sample(self.sampler, noise, self.layout)

    def loss(self, model: mae_lib.MaskedAutoencoder, params, images: jax.Array, ids) -> jax.Array:
        """The method's objective for one batch: ``images [B, H, W, C]``, ids as ``TokenIds`` -> scalar."""
        output = model.apply({"params": params}, images, ids.visible, ids.decoded, ids.thrown)
        return mae_lib.reconstruction_loss(
            images, output, ids.decoded, ids.thrown, model.patch_size, self.norm_pix_loss, self.thrown_loss_weight
        )


def build(model_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
    """``(MaskedAutoencoder, Method)`` from the model and method config sections.

    Raises ``ValueError``, before anything compiles, for an unknown method or
    sampler, a throwing ratio the method or sampler cannot use, impossible
    ratios for the token grid, or a kernel that does not fit the grid.
    """
    if config.name not in METHODS:
        raise ValueError(f"unknown method {config.name!r}; choose one of {METHODS}.")
    if config.name == "mae" and config.throw_ratio:
        raise ValueError(
            f"method 'mae' reconstructs every masked token but throw_ratio={config.throw_ratio}; "
            "set method.throw_ratio=0, or use method 'partial' or 'prmim'."
        )
    if config.thrown_loss_weight < 0:
        raise ValueError(f"thrown_loss_weight={config.thrown_loss_weight} must be >= 0.")
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.aggregation_kernel = config.kernel_size if config.name == "prmim" else 0
    model = mae_lib.build_mae(model_config)
    layout = masking.TokenLayout(model.grid, config.mask_ratio, config.throw_ratio)
    masking.check_sampler(config.sampler, layout)
    method = Method(
        config.name, config.sampler, layout, config.kernel_size, config.thrown_loss_weight, config.norm_pix_loss
    )
    return model, method
