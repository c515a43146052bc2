"""Grain transforms of the pretraining and evaluation pipelines, in pipeline order.

Elements are dicts. Between transforms ``'image'`` is ``[H, W, C] uint8`` (after
``DecodeImage``) and then ``[size, size, C] float32`` (after ``Normalize``);
``'label'`` is an int. Random transforms are grain ``RandomMap`` s: they use only
the numpy generator grain hands them, which grain seeds from the pipeline seed
and the element's index, so an element's crop, flip and token sets never depend
on which process, thread or worker computes it, nor on what was read before it.

Image decoding (``DecodeImage``), with ``channels`` the model's input channels:

- Non-RGB images are converted, never rejected. ``channels=3``: grayscale
  (``L``, 16-bit ``I;16`` scaled to 8 bits), palette (``P``, through RGBA when
  it has transparency), ``CMYK`` and ``LA`` / ``RGBA`` (alpha dropped, as
  torchvision's ``ImageFolder`` loader does) go through Pillow's
  ``convert('RGB')``. ``channels=1``: Pillow's ``convert('L')`` (ITU-R 601-2
  luma). Already decoded arrays (TFDS, IDX) follow the same rules.
- A corrupt or undecodable image raises ``CorruptImageError`` (a
  ``ValueError``) naming the file, and stops the pipeline: skipping would
  change which images make up every later batch, which breaks exact resume
  and the per-process batch layout. Find the bad files of a folder with
  ``find_corrupt_images(source)`` and remove them.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import grain
import numpy as np
from PIL import Image

from prmim_jax import masking

_BICUBIC = Image.Resampling.BICUBIC


class CorruptImageError(ValueError):
    """An image file or byte string that Pillow cannot decode."""


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` converted to ``'RGB'`` (channels=3) or ``'L'`` (channels=1); see the module docstring."""
    target = "RGB" if channels == 3 else "L"
    if image.mode == target:
        return image
    if image.mode.startswith("I"):
        # 16-bit grayscale: convert() would clip at 255 instead of rescaling.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(target)


def _array_to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """An already decoded ``[H, W]`` or ``[H, W, 1|3|4] uint8`` array -> ``[H, W, channels] uint8``."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {array.shape}.")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}.")
    if array.shape[-1] == channels:
        return array
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)  # channels == 3
    rgb = Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")
    return np.asarray(_to_mode(rgb, channels)).reshape(*array.shape[:2], channels)


def decode_image(image: str | os.PathLike | bytes | np.ndarray, channels: int) -> np.ndarray:
    """A file path, encoded bytes or a decoded array -> ``[H, W, channels] uint8``.

    Raises ``CorruptImageError`` naming the file (or the byte count) when Pillow
    cannot decode it.
    """
    if isinstance(image, np.ndarray):
        return _array_to_channels(image, channels)
    what = f"{len(image)} bytes of image data" if isinstance(image, bytes) else os.fspath(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.load()  # raises on a truncated file (Pillow's LOAD_TRUNCATED_IMAGES is off)
            array = np.asarray(_to_mode(opened, channels))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{what}: cannot decode the image ({error}); remove or replace it.") from error
    return array.reshape(*array.shape[:2], channels)


def find_corrupt_images(source, channels: int = 3) -> list[tuple[int, str]]:
    """``(index, message)`` for every item of ``source`` that ``decode_image`` rejects."""
    bad = []
    for index in range(len(source)):
        try:
            decode_image(source[index]["image"], channels)
        except CorruptImageError as error:
            bad.append((index, str(error)))
    return bad


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """``'image'``: path / bytes / array -> ``[H, W, channels] uint8``; other keys pass through."""

    channels: int

    def map(self, element: dict) -> dict:
        return element | {"image": decode_image(element["image"], self.channels)}


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio
    (width / height) log-uniform in ``ratio``; when none fits inside the image,
    the largest central crop whose ratio lies in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, round(height * max(ratio))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image)
    return array.reshape(*array.shape[:2], channels)


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip(grain.transforms.RandomMap):
    """MAE's augmentation: ``RandomResizedCrop(size, scale, ratio, bicubic)`` then a horizontal flip with p = 0.5.

    ``'image'``: ``[H, W, C] uint8`` -> ``[size, size, C] uint8``. The crop is
    cut, then resized (as torchvision's ``resized_crop`` on a PIL image).
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        height, width, channels = image.shape
        top, left, crop_h, crop_w = random_resized_crop_box(rng, height, width, self.scale, self.ratio)
        cropped = _pil(image).crop((left, top, left + crop_w, top + crop_h)).resize((self.size, self.size), _BICUBIC)
        # Drawn even when flipping is off, so the same seed gives the same crops either way.
        if rng.random() < 0.5 and self.flip:
            # In Pillow: a contiguous result, where numpy's [:, ::-1] view makes later copies slow.
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return element | {"image": _from_pil(cropped, channels)}


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop(grain.transforms.Map):
    """MAE's evaluation transform: bicubic resize of the shorter side to ``int(size / crop_pct)``, then a central ``size`` crop.

    ``'image'``: ``[H, W, C] uint8`` -> ``[size, size, C] uint8``; deterministic.
    ``crop_pct=0.875`` is MAE's (224 -> 256 -> 224); ``crop_pct=1`` on a
    ``size x size`` image (Fashion-MNIST at 28) is the identity.
    """

    size: int
    crop_pct: float = 0.875

    def __post_init__(self):
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct={self.crop_pct} must lie in (0, 1]: the crop is cut from the resized image.")

    def map(self, element: dict) -> dict:
        image = element["image"]
        height, width, channels = image.shape
        short = int(self.size / self.crop_pct)
        # torchvision's Resize(int): the longer side keeps the aspect ratio, truncated.
        if height <= width:
            new_h, new_w = short, int(short * width / height)
        else:
            new_h, new_w = int(short * height / width), short
        pil = _pil(image)
        if (new_h, new_w) != (height, width):
            pil = pil.resize((new_w, new_h), _BICUBIC)
        top, left = round((new_h - self.size) / 2), round((new_w - self.size) / 2)
        pil = pil.crop((left, top, left + self.size, top + self.size))
        return element | {"image": _from_pil(pil, channels)}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """``'image'``: ``[H, W, C] uint8`` -> ``(image / 255 - mean) / std`` as ``[H, W, C] float32``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must have one entry per channel.")
        std = np.asarray(self.std, np.float64)
        # One multiply-add per pixel; frozen dataclass, hence object.__setattr__.
        object.__setattr__(self, "_scale", (1.0 / (255.0 * std)).astype(np.float32))
        object.__setattr__(self, "_offset", (-np.asarray(self.mean, np.float64) / std).astype(np.float32))

    def map(self, element: dict) -> dict:
        image = element["image"]
        height, width, channels = image.shape
        # As [H, W * C] rows with the per-channel constants tiled along a row: numpy's
        # inner loops then run W * C long instead of C (8x faster at C = 3).
        rows = image.reshape(height, width * channels).astype(np.float32)
        rows *= np.tile(self._scale, width)
        rows += np.tile(self._offset, width)
        return element | {"image": rows.reshape(height, width, channels)}


@dataclasses.dataclass(frozen=True)
class DrawTokenNoise(grain.transforms.RandomMap):
    """Adds ``'token_noise'``: this image's ``[2, N] float32`` from ``masking.draw_noise``."""

    layout: masking.TokenLayout

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return element | {"token_noise": masking.draw_noise(rng, self.layout)}


@dataclasses.dataclass(frozen=True)
class SampleTokens(grain.transforms.Map):
    """A batch of elements -> the pretraining batch, token sets drawn by ``sampler`` over the whole batch at once.

    Input: ``{'image': [B, H, W, C] float32, 'label': [B] int, 'token_noise':
    [B, 2, N] float32}``. Output: ``{'images', 'labels': [B] int32,
    'ids_visible': [B, N_vis] int32, 'ids_decoded': [B, N_dec] int32,
    'ids_thrown': [B, N_thr] int32}`` (the convention of ``prmim_jax.masking``).
    """

    sampler: str
    layout: masking.TokenLayout

    def __post_init__(self):
        masking.check_sampler(self.sampler, self.layout)

    def map(self, batch: dict) -> dict:
        ids = masking.sample(self.sampler, batch["token_noise"], self.layout)
        return {
            "images": batch["image"],
            "labels": np.asarray(batch["label"], np.int32),
            "ids_visible": ids.visible,
            "ids_decoded": ids.decoded,
            "ids_thrown": ids.thrown,
        }


@dataclasses.dataclass(frozen=True)
class EvalBatch(grain.transforms.Map):
    """A batch of elements -> ``{'images', 'labels': [B] int32, 'mask': [B] bool}`` (``mask`` False on padding rows)."""

    def map(self, batch: dict) -> dict:
        return {
            "images": batch["image"],
            "labels": np.asarray(batch["label"], np.int32),
            "mask": np.asarray(batch["mask"], bool),
        }
