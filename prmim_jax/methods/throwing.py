"""What every method with a thrown set shares: token sets on the host, the three reconstructions, the aggregator.

The keys of a method section that this module reads (``throwing_config``):

==========================  ================================================================
key                         meaning
==========================  ================================================================
``reconstruction``          ``full`` (every masked token is reconstructed by the framework's
                            decoder/head; nothing thrown), ``partial`` (thrown tokens are
                            skipped and get no loss) or ``progressive`` (PR-MIM: the
                            aggregator reconstructs the thrown tokens from the others)
``sampler``                 token sampler of ``prmim_jax.masking`` (``random`` throws nothing;
                            ``random_throw``, ``furthest`` (Alg. 1), ``furthest_seeded``,
                            ``running_cell`` (VideoMAE V2), ``amt`` (AMT's attention maps))
``amt_interval``            ``amt``: epochs between two passes of the attention maps (AMT's 40)
``amt_warmup_epochs``       ``amt``: the first pass follows epoch ``amt_warmup_epochs`` (from 0;
                            AMT's 40); before it, ``amt`` masks at random, throwing nothing
``amt_warmup_mask_ratio``   ``amt``: the masking ratio before the first pass (AMT's 0.75 for MAE,
                            ``mae-AMT/models_mae.py``; SimMIM-AMT's 0.44)
``mask_ratio``              rho_e, fraction of the N tokens masked
``throw_ratio``             rho_d, fraction of the N tokens thrown (0 for ``full``)
``aggregator``              progressive reconstruction's design: ``dwconv`` (the paper's),
                            ``transformer``, ``convnext``, ``avgpool`` (Tables 11-12)
``kernel_size``             its window (3 to 11; 7 by default)
``thrown_loss_weight``      a thrown token's loss weight against a decoded one's (progressive)
``running_cell_decoder``    MAE's section only (``methods.mae``): ``masked`` (ours: the decoder
                            sees masked tokens only) or ``videomae`` (VideoMAE V2's running-cell
                            decoder, ``masking.TokenLayout``'s); absent elsewhere: ``masked``
==========================  ================================================================

Turning PR-MIM on in any framework is one key: ``reconstruction='progressive'``.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from prmim_jax import attention_maps, config_args, masking, masking_transforms, optim, pictures
from prmim_jax.methods import HostTransforms, Method
from prmim_jax.models import aggregate

RECONSTRUCTIONS = ("full", "partial", "progressive")


def throwing_config(reconstruction: str = "progressive", **overrides) -> dict:
    """The thrown-set keys of a method section (the paper's defaults: Table 13, Sec. 3) as a plain dict."""
    full = reconstruction == "full"
    return (
        dict(
            reconstruction=reconstruction,
            sampler="random" if full else "furthest",
            mask_ratio=0.75,
            throw_ratio=0.0 if full else 0.5,
            aggregator="dwconv",
            kernel_size=7,
            thrown_loss_weight=1.0,
            amt_interval=40,  # AMT's main_pretrain.py: --loc_interval 40
            amt_warmup_epochs=40,  # and --warmup_epochs 40
            amt_warmup_mask_ratio=0.75,  # mae-AMT/models_mae.py L207-210: random_masking(x, mask_ratio=0.75)
        )
        | overrides
    )


@dataclasses.dataclass(frozen=True)
class Throwing:
    """A validated thrown-set setting for one token grid (hashable, so jitted steps can close over it)."""

    reconstruction: str
    sampler: str
    layout: masking.TokenLayout
    aggregator: str
    kernel_size: int
    thrown_loss_weight: float
    warmup_layout: masking.TokenLayout | None = None  # ``amt`` before its first map (``amt_warmup_mask_ratio``)

    @classmethod
    def from_config(
        cls, section, grid: tuple[int, int], mask_unit: int | None = None, throw_granularity: str = "token"
    ) -> Throwing:
        """Raises ``ValueError`` naming the fix for an impossible combination of the section's keys.

        ``mask_unit`` / ``throw_granularity``: ``masking.TokenLayout``'s (SimMIM's unit masks)."""
        if section.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"method.reconstruction={section.reconstruction!r}; choose one of {RECONSTRUCTIONS}.")
        if section.reconstruction == "full" and section.throw_ratio:
            raise ValueError(
                f"reconstruction 'full' reconstructs every masked token but throw_ratio={section.throw_ratio}; "
                "set method.throw_ratio=0, or method.reconstruction='partial' or 'progressive'."
            )
        running_cell_decoder = section.get("running_cell_decoder", "masked")
        if running_cell_decoder == "videomae" and section.reconstruction != "partial":
            raise ValueError(
                "method.running_cell_decoder='videomae' (VideoMAE V2's running-cell decoder) is partial "
                "reconstruction: its thrown positions include visible tokens and nothing reconstructs them, so it "
                f"cannot be reconstruction {section.reconstruction!r}; set method.reconstruction='partial', or "
                "method.running_cell_decoder='masked'."
            )
        if section.thrown_loss_weight < 0:
            raise ValueError(f"method.thrown_loss_weight={section.thrown_loss_weight} must be >= 0.")
        for key, minimum, meaning in (
            ("amt_interval", 1, "epochs between two attention-map passes"),
            ("amt_warmup_epochs", 0, "epochs of random masking before the first pass"),
        ):
            value = section.get(key, minimum)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"method.{key}={value!r} must be an integer >= {minimum} ({meaning}; AMT's 40); "
                    f"set --config.method.{key}."
                )
        if section.aggregator not in aggregate.AGGREGATORS:
            raise ValueError(f"method.aggregator={section.aggregator!r}; choose one of {aggregate.AGGREGATORS}.")
        kernel = section.kernel_size
        if section.reconstruction == "progressive":
            try:
                aggregate.check_kernel_size(kernel, tuple(grid))
            except ValueError as error:
                raise ValueError(f"method.{error}") from None
        layout = masking.TokenLayout(
            tuple(grid),
            section.mask_ratio,
            section.throw_ratio,
            mask_unit=mask_unit,
            throw_granularity=throw_granularity,
            running_cell_decoder=running_cell_decoder,
        )
        masking.check_sampler(section.sampler, layout)
        warmup_layout = None
        if section.sampler == "amt" and section.get("amt_warmup_mask_ratio") is not None:
            # AMT before its first map: plain random masking at its own ratio, nothing thrown (configs saved
            # before the key existed drew the main layout from uniform weights).
            warmup_layout = masking.TokenLayout(
                tuple(grid), section.amt_warmup_mask_ratio, 0.0, mask_unit=mask_unit, throw_granularity="token"
            )
        return cls(
            section.reconstruction,
            section.sampler,
            layout,
            section.aggregator,
            kernel,
            float(section.thrown_loss_weight),
            warmup_layout,
        )

    @property
    def progressive(self) -> bool:
        return self.reconstruction == "progressive"

    @property
    def host(self) -> HostTransforms:
        """Per-image noise, then the batch's token sets ``ids_visible / ids_decoded / ids_thrown``; ``amt``
        draws them in the trainer from its attention maps (``host_state``), so its batches carry the noise,
        each image's source index and its crop instead."""
        if self.sampler == "amt":
            return HostTransforms(masking_transforms.DrawTokenNoise(self.layout), element_info=True)
        return HostTransforms(
            masking_transforms.DrawTokenNoise(self.layout), masking_transforms.SampleTokens(self.sampler, self.layout)
        )

    def ids_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, int], type]]:
        layout = self.layout
        return {
            "ids_visible": ((batch_size, layout.num_visible), np.int32),
            "ids_decoded": ((batch_size, layout.num_decoded), np.int32),
            "ids_thrown": ((batch_size, layout.num_thrown), np.int32),
        }

    def sample(self, noise: np.ndarray) -> masking.TokenIds:
        """``noise [B, 2, N]`` (``masking.draw_noise`` per image) -> this setting's ``TokenIds``."""
        return masking.sample(self.sampler, noise, self.layout)

    def aggregator_module(self, dtype, width: int, **options):
        """The progressive aggregator (``(features, ids_present, ids_thrown) -> [B, T, C]``), or None.

        ``options``: ``models.aggregate.build_aggregator``'s (``num_heads``, ``mlp_ratio``, ...)."""
        if not self.progressive:
            return None
        return aggregate.build_aggregator(
            self.aggregator, self.layout.grid, self.kernel_size, dtype, width=width, **options
        )


def batch_ids(batch: dict) -> masking.TokenIds:
    return masking.TokenIds(batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"])


def complete_section(given: ml_collections.ConfigDict, default_config) -> ml_collections.ConfigDict:
    """``given`` over ``default_config(reconstruction=...)``; ``ValueError`` naming any key the method does not read.

    A section without ``reconstruction`` (saved before it existed) is the framework's baseline, ``full``.
    """
    section = default_config(reconstruction=given.get("reconstruction", "full"))
    unknown = set(given) - set(section)
    if unknown:
        match = config_args.closest(min(unknown), section)
        hint = f" (did you mean --config.method.{match}?)" if match else ""
        raise ValueError(
            f"method section has unknown keys {sorted(unknown)}{hint}; the {section.name} method reads {sorted(section)}."
        )
    section.update(given)
    return section


class ThrowingMethod(Method):
    """What a framework with a thrown set shares: its batches (images and the token sets of ``throwing``),
    its sampler, and its picture. Subclasses set ``config``, ``throwing``, ``model`` (with ``image_size``,
    ``channels``, ``patch_size``), ``norm_pix_loss`` and ``predict``; one whose targets are not pixels
    (HOG, a teacher's features) sets ``reconstructs_pixels`` False and draws no picture."""

    throwing: Throwing
    norm_pix_loss: bool = False
    reconstructs_pixels: bool = True

    def predict(self, params, images, ids: masking.TokenIds):
        """The model's output (``pred_decoded``, ``pred_thrown``) for ``images`` and ``ids``, inference mode."""
        raise NotImplementedError

    def optimizer(self, global_batch: int, total_steps: int):
        """AdamW with warmup + cosine from ``config.optimizer`` (``optim.build_optimizer``)."""
        return optim.build_optimizer(self.config.optimizer, global_batch, total_steps)

    @property
    def layout(self) -> masking.TokenLayout:
        return self.throwing.layout

    @property
    def host(self):
        return self.throwing.host

    def host_state(self, placement, global_batch: int):
        """``amt``'s attention maps (``prmim_jax.attention_maps.AttentionMaps``); None for the other samplers."""
        if self.throwing.sampler != "amt":
            return None
        return attention_maps.AttentionMaps(self, placement, global_batch)

    def predict_fns(self) -> dict:
        """The encoder's predictions, and ``picture`` where the method reconstructs pixels."""
        return super().predict_fns() | ({"picture": self.picture} if self.reconstructs_pixels else {})

    def batch_spec(self, batch_size: int) -> dict:
        images = ((batch_size, *self.model.image_size, self.model.channels), np.float32)
        specs = {"images": images} | self.throwing.ids_spec(batch_size)
        return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in specs.items()}

    def sample(self, noise: np.ndarray) -> masking.TokenIds:
        """``noise [B, 2, N]`` (``masking.draw_noise`` per image) -> this method's ``TokenIds``."""
        return self.throwing.sample(noise)

    def picture(self, variables, images: np.ndarray, seed: int = 0) -> pictures.Picture:
        """Original / visible / reconstruction rows (``prmim_jax.pictures``) for ``images [b, H, W, C]`` (uint8
        pixels or normalised), token sets from noise of ``seed``: the same visible tokens for every method."""
        data = self.config.data
        images = np.asarray(self.normalize(images))
        rng = np.random.default_rng(seed)
        ids = self.sample(np.stack([masking.draw_noise(rng, self.layout) for _ in range(len(images))]))
        output = self.predict(variables.params, images, ids)
        rows = pictures.picture_rows(
            images, ids, output, self.model.patch_size, data.mean, data.std, self.norm_pix_loss
        )
        return pictures.Picture(rows, pictures.token_marks(ids, self.layout.num_tokens), self.model.patch_size)
