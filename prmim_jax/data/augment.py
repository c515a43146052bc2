"""MAE's fine-tuning augmentations (its Table 14): RandAugment, random erasing, mixup / cutmix, label smoothing.

Host side, as grain ``RandomMap`` s that use only the numpy generator grain hands
them (so an element's augmentation depends on the pipeline seed and its index
alone, as in ``prmim_jax.data.transforms``):

- ``RandAugment``: ``'image'`` ``[H, W, C] uint8`` -> ``[H, W, C] uint8``
  (``C`` 1 or 3), after ``transforms.RandomResizedCropFlip``. timm's
  ``rand_augment_transform('rand-m9-mstd0.5-inc1')`` as MAE's fine-tuning
  builds it; the pixel operations are Pillow's.
- ``RandomErasing``: ``'image'`` ``[H, W, C] float32`` -> the same, after
  ``transforms.Normalize``. timm's ``RandomErasing(mode='pixel', max_count=1)``.

On device, in the jitted train step (pure ``jax.numpy``, static shapes):

- ``mix_batch``: timm's ``Mixup`` in ``'batch'`` mode, with label smoothing.
- ``smooth_targets``: the smoothed one-hot targets, for when mixing is off.

The policy is written here rather than imported because timm's package imports
torch, which a JAX data pipeline (and each of its worker processes) should not
load. ``tests/test_augment.py`` checks the argument mappings and the operations
against Pillow directly.
"""

from __future__ import annotations

import dataclasses
import math
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from prmim_jax.data import transforms

_BICUBIC = Image.Resampling.BICUBIC  # MAE passes interpolation='bicubic' to timm's create_transform
_LEVEL_MAX = 10.0  # timm's magnitude scale: arguments are linear in magnitude / 10

# timm's _RAND_INCREASING_TRANSFORMS ('inc1'): every op gets stronger as the magnitude grows.
INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# timm's _RAND_TRANSFORMS (no 'inc'): Posterize and Solarize weaken as the magnitude grows, and the
# enhancement factors run from 0.1 to 1.9 without a random sign.
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# Ops whose argument takes a random sign (timm's _randomly_negate).
SIGNED_OPS = frozenset(
    {
        "Rotate",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
    }
)
_GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}


# --- RandAugment -----------------------------------------------------------------------------------


def op_argument(name: str, magnitude: float, negate: bool = False) -> float | int | None:
    """The Pillow argument of op ``name`` at ``magnitude`` (timm's ``LEVEL_TO_ARG``; ``None``: the op takes none).

    ``magnitude`` is on timm's 0..10 scale; ``negate`` flips the sign of the ops in
    ``SIGNED_OPS`` (for the ``*Increasing`` enhancements: the factor ``1 - x``
    instead of ``1 + x``) and is ignored by the others. At magnitude 9:

    - Rotate 27 degrees; ShearX / ShearY 0.27; TranslateXRel / TranslateYRel 0.405
      of the width / height.
    - PosterizeIncreasing keeps 1 bit (Posterize 3); SolarizeIncreasing inverts
      pixels >= 26 (Solarize >= 230); SolarizeAdd adds 99 below 128.
    - ColorIncreasing, ... SharpnessIncreasing: factor 1.81 (0.19 negated);
      Color, ... Sharpness: 1.72.
    """
    level = magnitude / _LEVEL_MAX
    sign = -1.0 if negate else 1.0
    base = name.removesuffix("Increasing")
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return int(level * 256)
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if name == "SolarizeAdd":
        return int(level * 110)
    if name in _ENHANCERS:
        return level * 1.8 + 0.1
    if base in _ENHANCERS:
        return max(0.1, 1.0 + sign * level * 0.9)
    raise ValueError(f"unknown RandAugment op {name!r}; known ops: {sorted(set(OPS) | set(INCREASING_OPS))}.")


def _pil_fill(fill: int | tuple[int, ...], channels: int) -> int | tuple[int, ...]:
    """Pillow's ``fillcolor`` for an ``'L'`` (one int) or ``'RGB'`` (three ints) image."""
    if isinstance(fill, int | np.integer):
        return int(fill) if channels == 1 else (int(fill),) * channels
    fill = tuple(int(v) for v in fill)
    if len(fill) != channels:
        raise ValueError(f"fill {fill} needs one value per channel ({channels}), or one int for all.")
    return fill[0] if channels == 1 else fill


def _apply_pil(image: Image.Image, name: str, argument, fillcolor) -> Image.Image:
    """``image`` after op ``name`` with its Pillow ``argument`` (see ``op_argument``)."""
    width, height = image.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name in _GEOMETRIC_OPS:
        if name == "Rotate":
            return image.rotate(argument, resample=_BICUBIC, fillcolor=fillcolor)
        # Pillow's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
        matrix = {
            "ShearX": (1, argument, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, argument, 1, 0),
            "TranslateXRel": (1, 0, argument * width, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, argument * height),
        }[name]
        return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=_BICUBIC, fillcolor=fillcolor)
    if name.startswith("Posterize"):
        if argument <= 0:
            # Magnitude 10 asks timm for 0 bits, which older Pillow turned black; Pillow >= 10 refuses it.
            return Image.new(image.mode, image.size, 0)
        return image if argument >= 8 else ImageOps.posterize(image, argument)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(image, argument)
    if name == "SolarizeAdd":
        values = np.arange(256)
        lut = np.where(values < 128, np.minimum(255, values + argument), values).tolist()
        return image.point(lut * len(image.getbands()))
    return _ENHANCERS[name.removesuffix("Increasing")](image).enhance(argument)


def augment_op(
    image: np.ndarray, name: str, magnitude: float, *, negate: bool = False, fill: int | tuple[int, ...] = 128
) -> np.ndarray:
    """One RandAugment op, deterministic: ``[H, W, C] uint8`` (``C`` 1 or 3) -> ``[H, W, C] uint8``.

    The op runs in Pillow on the ``'L'`` / ``'RGB'`` image with the argument of
    ``op_argument(name, magnitude, negate)``; geometric ops (Rotate, Shear*,
    Translate*Rel) resample bicubically and fill uncovered pixels with ``fill``
    (an int for every channel, or one value per channel).
    """
    channels = image.shape[-1]
    argument = op_argument(name, magnitude, negate)
    out = _apply_pil(transforms._pil(image), name, argument, _pil_fill(fill, channels))
    return transforms._from_pil(out, channels)


@dataclasses.dataclass(frozen=True)
class RandAugment(grain.transforms.RandomMap):
    """timm's RandAugment: ``'image'`` ``[H, W, C] uint8`` -> ``[H, W, C] uint8`` (``C`` 1 or 3); other keys pass through.

    Per image: ``num_ops`` ops drawn uniformly, with replacement, from
    ``INCREASING_OPS`` (``OPS`` when ``increasing`` is False). Each is applied
    with probability ``prob``, at a magnitude drawn for that op from
    ``N(magnitude, magnitude_std)`` (uniform on ``[0, magnitude]`` when
    ``magnitude_std`` is ``inf``; fixed when 0) and clipped to ``[0, 10]``; the
    ops in ``SIGNED_OPS`` take a random sign. ``augment_op`` gives the
    operations. The defaults are MAE's ``rand-m9-mstd0.5-inc1``; ``fill`` is
    timm's default grey (MAE's fine-tuning fills with the normalisation mean,
    ``round(255 * mean)``, which ``pipeline.finetune_dataset`` passes).
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5
    increasing: bool = True
    fill: int | tuple[int, ...] = 128

    def __post_init__(self):
        if self.num_ops < 0:
            raise ValueError(f"num_ops={self.num_ops} must be >= 0.")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob={self.prob} must lie in [0, 1].")
        if self.magnitude < 0 or self.magnitude_std < 0:
            raise ValueError(f"magnitude={self.magnitude} and magnitude_std={self.magnitude_std} must be >= 0.")

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS

    def _draw_magnitude(self, rng: np.random.Generator) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return float(np.clip(magnitude, 0.0, _LEVEL_MAX))

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        channels = image.shape[-1]
        fillcolor = _pil_fill(self.fill, channels)
        pil = transforms._pil(image)
        for index in rng.integers(0, len(self.ops), size=self.num_ops):
            name = self.ops[index]
            if rng.random() >= self.prob:
                continue
            magnitude = self._draw_magnitude(rng)
            negate = name in SIGNED_OPS and rng.random() > 0.5
            pil = _apply_pil(pil, name, op_argument(name, magnitude, negate), fillcolor)
        return element | {"image": transforms._from_pil(pil, channels)}


def rand_augment_from_string(spec: str, fill: int | tuple[int, ...] = 128) -> RandAugment:
    """A ``RandAugment`` from timm's config string, e.g. MAE's ``'rand-m9-mstd0.5-inc1'``.

    ``'rand'`` then ``-`` separated sections: ``m<float>`` magnitude (default
    10, as timm), ``n<int>`` ops per image (2), ``mstd<float>`` magnitude std
    (0; above 100 means uniform on ``[0, m]``), ``inc<0|1>`` the increasing op
    list (0; note timm reads any ``inc`` value, ``inc0`` included, as 1, where
    this reads ``inc0`` as off). Raises ``ValueError`` on anything else (timm's
    weighted choice ``w`` and ``mmax`` are not supported).
    """
    sections = spec.split("-") if isinstance(spec, str) else None
    if not sections or sections[0] != "rand":
        raise ValueError(
            f"RandAugment spec {spec!r} must be a string starting with 'rand', e.g. 'rand-m9-mstd0.5-inc1'."
        )
    kwargs = dict(magnitude=_LEVEL_MAX, magnitude_std=0.0, increasing=False)
    parsers = {
        "m": ("magnitude", float),
        "n": ("num_ops", int),
        "mstd": ("magnitude_std", lambda v: math.inf if float(v) > 100 else float(v)),
        "inc": ("increasing", lambda v: bool(int(v))),
    }
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None or match[1] not in parsers:
            raise ValueError(
                f"RandAugment spec {spec!r}: cannot read section {section!r}; "
                "expected m<magnitude>, n<num_ops>, mstd<std>, inc<0|1>."
            )
        key, parse = parsers[match[1]]
        try:
            kwargs[key] = parse(match[2])
        except ValueError as error:
            raise ValueError(f"RandAugment spec {spec!r}: bad value in section {section!r}.") from error
    return RandAugment(**kwargs, prob=0.5, fill=fill)


# --- random erasing --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RandomErasing(grain.transforms.RandomMap):
    """timm's ``RandomErasing(mode='pixel', max_count=1)``: ``'image'`` ``[H, W, C] float32`` -> the same.

    With probability ``prob``: up to 10 tries of a box with area fraction
    uniform in ``[min_area, max_area]`` and aspect ratio (height / width)
    log-uniform in ``[min_aspect, 1 / min_aspect]``, ``h = round(sqrt(area *
    aspect))``, ``w = round(sqrt(area / aspect))``; the first box with ``h < H``
    and ``w < W`` is placed uniformly and its pixels replaced by ``N(0, 1)``
    noise, drawn per pixel and channel (the images are normalised, so this is
    noise at the data's scale). If no try fits, the image is unchanged.
    """

    prob: float = 0.25
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob={self.prob} must lie in [0, 1].")
        if not 0.0 < self.min_area <= self.max_area <= 1.0:
            raise ValueError(f"min_area={self.min_area}, max_area={self.max_area}: need 0 < min <= max <= 1.")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"min_aspect={self.min_aspect} must lie in (0, 1].")

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.prob:
            return element
        image = element["image"]
        height, width, channels = image.shape
        log_aspect = math.log(self.min_aspect)
        for _ in range(10):
            area = rng.uniform(self.min_area, self.max_area) * height * width
            aspect = math.exp(rng.uniform(log_aspect, -log_aspect))
            box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if box_h < height and box_w < width:
                top = int(rng.integers(0, height - box_h + 1))
                left = int(rng.integers(0, width - box_w + 1))
                erased = np.array(image, dtype=np.float32)
                erased[top : top + box_h, left : left + box_w] = rng.standard_normal(
                    (box_h, box_w, channels), dtype=np.float32
                )
                return element | {"image": erased}
        return element


# --- mixup / cutmix, on device ---------------------------------------------------------------------


def smooth_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """``labels`` ``[B] int`` -> ``[B, num_classes] float32`` smoothed one-hot targets, as timm's.

    The label's entry is ``1 - label_smoothing + label_smoothing / num_classes``,
    every other entry ``label_smoothing / num_classes``; each row sums to 1.
    """
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    one_hot = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)
    return jnp.where(one_hot, jnp.float32(on), jnp.float32(off))


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """timm's ``rand_bbox``: a ``[height, width] bool`` box mask and the corrected ``lam`` (``[] float32``).

    Box sides ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))``, centred on a
    uniform pixel and clipped to the image (the half sides rounded down, so the
    unclipped box is ``2 (cut // 2)`` long). The corrected ``lam`` is the
    fraction of the image outside the box.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    center_y = jax.random.randint(key_y, (), 0, height)
    center_x = jax.random.randint(key_x, (), 0, width)
    top, bottom = jnp.clip(center_y - cut_h // 2, 0, height), jnp.clip(center_y + cut_h // 2, 0, height)
    left, right = jnp.clip(center_x - cut_w // 2, 0, width), jnp.clip(center_x + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    corrected = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    return box, corrected


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm's ``Mixup(mode='batch')``: ``images [B, H, W, C]`` float, ``labels [B] int`` -> ``(images, targets)``.

    Returns ``images`` ``[B, H, W, C]`` (same dtype) and ``targets`` ``[B,
    num_classes] float32``, rows summing to 1. One draw for the whole batch:
    with probability ``prob`` it is mixed, by cutmix with probability
    ``switch_prob`` when both alphas are > 0 (else by whichever is > 0), with
    ``lam ~ Beta(alpha, alpha)`` of the chosen method. Image ``i`` is mixed with
    image ``B - 1 - i`` (the batch reversed, timm's ``x.flip(0)``):

    - mixup: ``lam * x[i] + (1 - lam) * x[B - 1 - i]``;
    - cutmix: ``x[i]`` with the box of ``cutmix_box`` pasted from
      ``x[B - 1 - i]``, ``lam`` corrected to the unpasted area fraction.

    ``targets = lam * smooth(y) + (1 - lam) * smooth(y reversed)`` with
    ``smooth_targets(., num_classes, label_smoothing)``; unmixed, ``lam = 1``.

    Jittable (the alphas and probabilities are static Python floats: bind them
    with ``functools.partial``), with a batch sharded over devices. The pairing
    reverses the whole global batch, not each device's part (under DDP, MAE's
    timm mixes each GPU's local batch): XLA moves the reversed images between
    devices, one permutation of the batch per step, small beside the model.
    The pairs are as random either way, since batches are random draws of the
    shuffled data, and this way the result does not depend on the device count.
    """
    if not num_classes >= 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1.")
    for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1].")
    if mixup_alpha < 0 or cutmix_alpha < 0 or (prob > 0 and mixup_alpha == cutmix_alpha == 0):
        raise ValueError(
            f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: both must be >= 0 and one > 0 "
            "(set prob=0 to turn mixing off, or use smooth_targets)."
        )
    height, width = images.shape[1:3]
    key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(rng, 5)
    do_mix = jax.random.uniform(key_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    box, lam_cutmix = cutmix_box(key_box, lam_cutmix, height, width)

    reversed_images = images[::-1]
    lam = jnp.where(do_mix, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    blended = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * reversed_images
    pasted = jnp.where(box[None, :, :, None], reversed_images, images)
    mixed = jnp.where(do_mix, jnp.where(use_cutmix, pasted, blended), images)

    targets = smooth_targets(labels, num_classes, label_smoothing)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed, targets
