"""Grain transforms of the pretraining and evaluation pipelines, in pipeline order.

Elements are dicts. Between transforms ``'image'`` is ``[H, W, C] uint8`` (after
``DecodeImage`` and the crops), and ``[size, size, C] float32`` only after a
host ``Normalize`` (by default the batches stay uint8 and the device normalises
them with ``normalize_images``: four times fewer bytes to the accelerator and
no host time spent on it); ``'label'`` is an int. Random transforms are grain
``RandomMap`` s: they use only the numpy generator grain hands them, which grain
seeds from the pipeline seed and the element's index, so an element's crop,
flip and token sets never depend on which process, thread or worker computes
it, nor on what was read before it.

Image decoding (``DecodeImage``), with ``channels`` the model's input channels:

- JPEGs in YCbCr (photographs: ImageNet, most image folders) are decoded with
  libjpeg-turbo through ``simplejpeg`` when it is installed
  (``jpeg_decoder='simplejpeg'``, the default): the same pixels as Pillow's
  decoder, bit for bit (tested), without Pillow's per-image overhead.
  Everything else goes through Pillow: other formats, grayscale / CMYK / YCCK
  JPEGs, ``channels=1``, and any JPEG that simplejpeg refuses (Pillow then
  decodes it or words the error).
- Images of every Pillow mode are converted. ``channels=3``: bilevel (``1``),
  grayscale (``L``), palette (``P``, through RGBA when it has transparency;
  ``PA``), ``CMYK``, ``YCbCr``, ``LAB`` and ``LA`` / ``RGBA`` (alpha dropped,
  as torchvision's ``ImageFolder`` loader does) go through Pillow's
  ``convert('RGB')``. ``channels=1``: Pillow's ``convert('L')`` (ITU-R 601-2
  luma). High-depth grayscale is scaled to 8 bits by its type's range, not
  clipped: 16-bit (``I;16``, ``I;16B``, ...) and 32-bit integer (``I``) images
  by 65535, float (``F``) images by 1; 32-bit values outside 16 bits and floats
  outside [0, 1] are refused (``CorruptImageError``) rather than wrapped or
  zeroed (``_high_depth_to_uint8`` says why). Already decoded arrays (IDX)
  follow the same rules.
- A corrupt or undecodable image raises ``CorruptImageError`` (a
  ``ValueError``) naming the file, and stops the pipeline: skipping would
  change which images make up every later batch, which breaks exact resume
  and the per-process batch layout. Find the bad files of a folder with
  ``find_corrupt_images(source)`` and remove them.

Resampling of the training crop (``RandomResizedCropFlip``'s ``resampler``):

- ``'pillow'``: Pillow's antialiased bicubic resize of the cut-out crop, as
  torchvision's ``RandomResizedCrop`` on a PIL image (MAE's recipe). The
  reference.
- ``'opencv'``: the same filter built from two OpenCV calls, several times
  faster: the crop is low-passed with Pillow's own kernel (bicubic, a = -0.5,
  stretched by the downscale factor ``s`` of each axis, sampled at whole
  pixels), then sampled with OpenCV's cubic interpolation. Close to Pillow's
  result, not equal: on photographs at 224 its difference from Pillow's crop
  is below the error that JPEG quality 90 itself leaves (the speeds and PSNRs:
  ``benchmarks/results/data_pipeline_cpu.md``). Falls back to Pillow, with a
  warning, when OpenCV is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import os
import pathlib

import grain
import numpy as np
from PIL import Image

_BICUBIC = Image.Resampling.BICUBIC
JPEG_DECODERS = ("simplejpeg", "pillow")
CROP_RESAMPLERS = ("opencv", "pillow")
_JPEG_START = b"\xff\xd8"  # SOI marker


@functools.cache
def _simplejpeg():
    """The ``simplejpeg`` module, or None when it is not installed (Pillow then decodes every JPEG)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


@functools.cache
def _opencv():
    """The ``cv2`` module with its thread pool off, or None (with a warning) when it is not installed."""
    try:
        import cv2
    except ImportError:
        logging.warning("OpenCV (opencv-python-headless) is not installed: crops are resized with Pillow, slower.")
        return None
    # One image per call is too small to split over threads, and grain's worker processes are
    # the parallelism: OpenCV's own pool would only compete with them for the cores.
    cv2.setNumThreads(1)
    return cv2


class CorruptImageError(ValueError):
    """An image file or byte string that Pillow cannot decode."""


# Largest value of 16-bit samples: I;16 images, and 32-bit ('I') images holding 16-bit data.
_UINT16_MAX = 65535


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit (``I;16``, ``I;16B``, ...), 32-bit integer (``I``) or float (``F``) grayscale image -> ``[H, W] uint8``.

    Each kind is scaled by its type's nominal range, never by the image's own
    min/max (which would give every picture its own contrast: a dark photograph
    would come out as bright as a light one):

    - integers, 16-bit or 32-bit: ``round(v * 255 / 65535)``. A 32-bit image is
      read as 16-bit data in a wider container (16-bit TIFFs from many tools;
      16-bit PNGs in older Pillow versions), since its own range (2^31 - 1) would make
      every real picture black;
    - floats: ``round(v * 255)`` for values in ``[0, 1]``, the convention of
      float images (scikit-image, OpenCV, TIFF writers).

    Raises ``ValueError`` (which ``decode_image`` reports as ``CorruptImageError``
    naming the file) for values outside that range, negative or non-finite ones:
    converting them anyway would wrap, clip or zero the picture silently.
    """
    values = np.asarray(image)
    if image.mode == "F":
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(
                f"a float ('F') image with values in [{np.nanmin(values):g}, {np.nanmax(values):g}]"
                f"{'' if np.isfinite(values).all() else ' and NaN/inf'}: only floats in [0, 1] are read "
                "(scaled by 255); save it rescaled to [0, 1], or as an 8- or 16-bit image"
            )
        return np.round(values.astype(np.float64) * 255.0).astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
        raise ValueError(
            f"a 32-bit integer ({image.mode!r}) image with values in [{values.min()}, {values.max()}], outside the "
            f"16-bit range [0, {_UINT16_MAX}] that integer images are scaled by; save it as an 8- or 16-bit image"
        )
    # round(v / 257) in integers: v * 255 / 65535 == v / 257.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` in any Pillow mode -> ``'RGB'`` (channels=3) or ``'L'`` (channels=1); see the module docstring.

    Raises ``ValueError`` for 32-bit / float values outside their range (``_high_depth_to_uint8``) and for
    modes Pillow cannot convert.
    """
    target = "RGB" if channels == 3 else "L"
    if image.mode == target:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's convert() clips these at 255 (16- and 32-bit) or truncates [0, 1] floats to 0.
        image = Image.fromarray(_high_depth_to_uint8(image), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # a palette with a transparent entry converts through its alpha
    try:
        return image.convert(target)
    except ValueError:
        return image.convert("RGB").convert(target)  # modes with no direct route to L (LAB)


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


def _decode_ycbcr_jpeg(data: bytes) -> np.ndarray | None:
    """A YCbCr JPEG -> ``[H, W, 3] uint8`` RGB through simplejpeg; None when simplejpeg should not (or cannot) decode it.

    None for: no simplejpeg, not a JPEG, another colour space (grayscale,
    CMYK, YCCK, RGB), a picture larger than Pillow's decompression-bomb limit,
    or any error (Pillow then decodes the file as before, or raises
    ``CorruptImageError`` in its own words).
    """
    simplejpeg = _simplejpeg()
    if simplejpeg is None or not data.startswith(_JPEG_START):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace != "YCbCr" or (Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS):
            return None
        # simplejpeg's defaults are Pillow's: accurate integer IDCT, smooth ("fancy") chroma upsampling.
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None


def decode_image(
    image: str | os.PathLike | bytes | np.ndarray, channels: int, jpeg_decoder: str = "simplejpeg"
) -> np.ndarray:
    """A file path, encoded bytes or a decoded array -> ``[H, W, channels] uint8``.

    ``jpeg_decoder``: ``'simplejpeg'`` decodes YCbCr JPEGs with simplejpeg
    (when installed; the same pixels as Pillow, faster), ``'pillow'`` decodes
    every file with Pillow. Raises ``CorruptImageError`` naming the file (or
    the byte count) when the image cannot be decoded.
    """
    if isinstance(image, np.ndarray):
        return _array_to_channels(image, channels)
    if jpeg_decoder not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder={jpeg_decoder!r}; choose one of {JPEG_DECODERS}.")
    what = f"{len(image)} bytes of image data" if isinstance(image, bytes) else os.fspath(image)
    try:
        data = image if isinstance(image, bytes) else pathlib.Path(image).read_bytes()
        if jpeg_decoder == "simplejpeg" and channels == 3:
            decoded = _decode_ycbcr_jpeg(data)
            if decoded is not None:
                return decoded
        with Image.open(io.BytesIO(data)) as opened:
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
    """``'image'``: path / bytes / array -> ``[H, W, channels] uint8``; other keys pass through.

    ``jpeg_decoder``: as ``decode_image``'s.
    """

    channels: int
    jpeg_decoder: str = "simplejpeg"

    def __post_init__(self):
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder={self.jpeg_decoder!r}; choose one of {JPEG_DECODERS}.")

    def map(self, element: dict) -> dict:
        return element | {"image": decode_image(element["image"], self.channels, self.jpeg_decoder)}


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


@functools.lru_cache(maxsize=8192)
def _antialias_kernel(length: int, size: int) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5) stretched by ``s = length / size``, at whole-pixel offsets.

    ``[2 ceil(2 s) - 1] float32`` summing to 1 (every tap inside the
    stretched support ``|x| < 2 s``); ``[1.0]`` (no filtering) when ``s <= 1``.
    """
    stretch = length / size
    if stretch <= 1:
        return np.ones(1, np.float32)
    radius = math.ceil(2 * stretch) - 1
    x = np.abs(np.arange(-radius, radius + 1)) / stretch
    a = -0.5
    kernel = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, (((x - 5) * x + 8) * x - 4) * a)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    kernel.flags.writeable = False  # shared by every call through the cache
    return kernel


def _resized_crop_pillow(image: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    top, left, crop_h, crop_w = box
    cropped = _pil(image).crop((left, top, left + crop_w, top + crop_h)).resize((size, size), _BICUBIC)
    if flip:
        # In Pillow: a contiguous result, where numpy's [:, ::-1] view makes later copies slow.
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _from_pil(cropped, image.shape[-1])


def _resized_crop_opencv(cv2, image: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    top, left, crop_h, crop_w = box
    crop = image[top : top + crop_h, left : left + crop_w]
    # Pillow weighs each output pixel's inputs by its kernel at their exact (fractional) offsets.
    # Here the low-pass runs at whole-pixel offsets over the whole crop (one separable SIMD pass),
    # and the cubic interpolation that follows supplies the fractional part.
    kernel_x, kernel_y = _antialias_kernel(crop_w, size), _antialias_kernel(crop_h, size)
    if kernel_x.size > 1 or kernel_y.size > 1:
        # Isolated: the crop's own edge pixels are repeated, as Pillow resizes the cut-out crop alone.
        border = cv2.BORDER_REPLICATE | cv2.BORDER_ISOLATED
        crop = cv2.sepFilter2D(crop, -1, kernel_x, kernel_y, borderType=border)
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
    if flip:
        resized = cv2.flip(resized, 1)
    return resized.reshape(size, size, image.shape[-1])  # OpenCV drops a single channel axis


def resized_crop(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, resampler: str = "pillow", flip: bool = False
) -> np.ndarray:
    """``image[top : top + height, left : left + width]`` resized to ``[size, size, C] uint8``, then mirrored if ``flip``.

    ``image``: ``[H, W, C] uint8``; ``box``: ``(top, left, height, width)`` as
    ``random_resized_crop_box`` returns. Antialiased bicubic resampling of the
    cut-out crop (as torchvision's ``resized_crop`` on a PIL image), computed
    by Pillow or approximated with OpenCV: ``resampler`` in
    ``CROP_RESAMPLERS``, see the module docstring. A contiguous array.
    """
    if resampler not in CROP_RESAMPLERS:
        raise ValueError(f"resampler={resampler!r}; choose one of {CROP_RESAMPLERS}.")
    cv2 = _opencv() if resampler == "opencv" else None
    if cv2 is None:
        return _resized_crop_pillow(image, box, size, flip)
    return _resized_crop_opencv(cv2, image, box, size, flip)


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip(grain.transforms.RandomMap):
    """MAE's augmentation: ``RandomResizedCrop(size, scale, ratio, bicubic)`` then a horizontal flip with p = 0.5.

    ``'image'``: ``[H, W, C] uint8`` -> ``[size, size, C] uint8``. The crop is
    cut, then resized (``resized_crop``, with ``resampler`` ``'pillow'`` or
    ``'opencv'``; the crop boxes and flips drawn from a seed are the same for both).
    ``record`` adds ``'crop'``: ``[5] float32`` ``(top / H, left / W, height / H,
    width / W, flip)``, the box as fractions of the decoded image and 1.0 when
    mirrored, so per-image maps can follow the augmentation (``attention_maps.crop_maps``).
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    resampler: str = "pillow"
    record: bool = False

    def __post_init__(self):
        if self.resampler not in CROP_RESAMPLERS:
            raise ValueError(f"resampler={self.resampler!r}; choose one of {CROP_RESAMPLERS}.")

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        height, width = image.shape[:2]
        box = random_resized_crop_box(rng, height, width, self.scale, self.ratio)
        # Drawn even when flipping is off, so the same seed gives the same crops either way.
        flip = rng.random() < 0.5 and self.flip
        element = element | {"image": resized_crop(image, box, self.size, self.resampler, flip)}
        if self.record:
            top, left, crop_h, crop_w = box
            crop = (top / height, left / width, crop_h / height, crop_w / width, float(flip))
            element["crop"] = np.array(crop, np.float32)
        return element


@dataclasses.dataclass(frozen=True)
class ResizePadCropFlip(grain.transforms.RandomMap):
    """MFF's augmentation (mmpretrain ``configs/mff/mff_vit-base-p16_8xb512-amp-coslr-800e_in1k.py``):
    torchvision's ``Resize(size)`` (the shorter side to ``size``, bilinear), ``RandomCrop(size, padding=padding,
    padding_mode='reflect')``, then a horizontal flip with p = 0.5.

    ``'image'``: ``[H, W, C] uint8`` -> ``[size, size, C] uint8``. ``record`` adds ``'crop'`` as
    ``RandomResizedCropFlip`` does (the box, as fractions of the image, may reach past its edges by the padding).
    """

    size: int
    padding: int = 4
    flip: bool = True
    record: bool = False

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        height, width, channels = image.shape
        # torchvision's Resize(int): the longer side keeps the aspect ratio, truncated.
        if height <= width:
            new_h, new_w = self.size, int(self.size * width / height)
        else:
            new_h, new_w = int(self.size * height / width), self.size
        if (new_h, new_w) != (height, width):
            image = _from_pil(_pil(image).resize((new_w, new_h), Image.Resampling.BILINEAR), channels)
        pad = self.padding
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        top = int(rng.integers(0, new_h + 2 * pad - self.size + 1))
        left = int(rng.integers(0, new_w + 2 * pad - self.size + 1))
        flip = rng.random() < 0.5 and self.flip  # drawn even when flipping is off: the same crops either way
        crop = padded[top : top + self.size, left : left + self.size]
        element = element | {"image": np.ascontiguousarray(crop[:, ::-1] if flip else crop)}
        if self.record:
            box = ((top - pad) / new_h, (left - pad) / new_w, self.size / new_h, self.size / new_w, float(flip))
            element["crop"] = np.array(box, np.float32)
        return element


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
class ResizeWhole(grain.transforms.Map):
    """The whole image squashed to ``[size, size, C] uint8`` (Pillow bicubic, aspect ratio not kept;
    torchvision's ``Resize((size, size))``, what AMT's map pass sees); deterministic."""

    size: int

    def map(self, element: dict) -> dict:
        image = element["image"]
        if image.shape[:2] != (self.size, self.size):
            image = _from_pil(_pil(image).resize((self.size, self.size), _BICUBIC), image.shape[-1])
        return element | {"image": image}


@dataclasses.dataclass(frozen=True)
class AttachIndex(grain.transforms.MapWithIndex):
    """Adds ``'index'``: the element's position in its source of ``size`` elements (before shuffling), an
    int. (Through a shuffled, repeated dataset grain hands the source the index plus the epoch times
    ``size``, hence the remainder.)"""

    size: int

    def map_with_index(self, index: int, element: dict) -> dict:
        return element | {"index": index % self.size}


def _normalization(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)``, ``[C] float32`` each: ``pixel * scale + offset = (pixel / 255 - mean) / std``."""
    if len(mean) != len(std):
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have one entry per channel.")
    std = np.asarray(std, np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (-np.asarray(mean, np.float64) / std).astype(np.float32)


def normalize_images(images, mean: tuple[float, ...], std: tuple[float, ...]):
    """Pixels ``[..., C] uint8`` -> ``(images / 255 - mean) / std`` as ``[..., C] float32``, with jax.numpy.

    The device side of ``data.device_normalize``: call it on ``batch['images']``
    inside the jitted step (``mean`` / ``std`` are the data config's). Float
    images pass through unchanged: they were normalised on the host
    (``device_normalize=False``, or fine-tuning with random erasing), so every
    step can call this whatever the config. Computes what ``Normalize`` does on
    the host (the same float32 constants; equal to within float32 rounding).

    Raises:
      TypeError: images neither uint8 nor floating point.
      ValueError: ``mean`` / ``std`` without one entry per channel.
    """
    import jax.numpy as jnp  # here, not at module level: grain's worker processes never need jax

    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8:
        raise TypeError(f"expected uint8 pixels (or already normalised float images), got {images.dtype}.")
    scale, offset = _normalization(mean, std)
    if images.shape[-1] != scale.size:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one entry per channel ({images.shape[-1]}).")
    return images.astype(jnp.float32) * scale + offset


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """``'image'``: ``[H, W, C] uint8`` -> ``(image / 255 - mean) / std`` as ``[H, W, C] float32``.

    On the host: the pipelines use it only with ``data.device_normalize=False``
    (or before random erasing); ``normalize_images`` is the device side.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        # One multiply-add per pixel; frozen dataclass, hence object.__setattr__.
        scale, offset = _normalization(self.mean, self.std)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_offset", offset)

    def map(self, element: dict) -> dict:
        image = element["image"]
        height, width, channels = image.shape
        # As [H, W * C] rows with the per-channel constants tiled along a row: numpy's
        # inner loops then run W * C long instead of C (timed: design_choices_cpu.md, "normalize").
        rows = image.reshape(height, width * channels).astype(np.float32)
        rows *= np.tile(self._scale, width)
        rows += np.tile(self._offset, width)
        return element | {"image": rows.reshape(height, width, channels)}


@dataclasses.dataclass(frozen=True)
class EvalBatch(grain.transforms.Map):
    """A batch of elements -> ``{'images', 'labels': [B] int32, 'mask': [B] bool}`` (``mask`` False on padding rows)."""

    def map(self, batch: dict) -> dict:
        return {
            "images": batch["image"],
            "labels": np.asarray(batch["label"], np.int32),
            "mask": np.asarray(batch["mask"], bool),
        }
