"""MAE's fine-tuning augmentations on the host (its Table 14): RandAugment and random erasing.

Host side, as grain ``RandomMap`` s that use only the numpy generator grain hands
them (so an element's augmentation depends on the pipeline seed and its index
alone, as in ``prmim_jax.data.transforms``):

- ``RandAugment``: ``'image'`` ``[H, W, C] uint8`` -> ``[H, W, C] uint8``
  (``C`` 1 or 3), after ``transforms.RandomResizedCropFlip``. timm's
  ``rand_augment_transform('rand-m9-mstd0.5-inc1')`` as MAE's fine-tuning
  builds it; the pixel operations are Pillow's.
- ``RandomErasing``: ``'image'`` ``[H, W, C] float32`` -> the same, after
  ``transforms.Normalize``. timm's ``RandomErasing(mode='pixel', max_count=1)``.

Mixup / cutmix and label smoothing run on device, in the train step: ``prmim_jax.mixing``.

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
