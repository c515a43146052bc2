"""The data section of an experiment config: its keys and per-source defaults, and the checks of its values.

``data_config(**overrides)`` makes a section, ``data_defaults(source)`` lists every key
a source reads (what validation holds a section to), ``check_config`` checks the
values and ``check_split`` / ``split_size`` what a split holds on disk, before any
pipeline is built (``prmim_jax.data.pipeline``).
"""

from __future__ import annotations

import pathlib

import ml_collections
from ml_collections import config_dict

from prmim_jax.data import augment, sources, transforms

SOURCES = ("fashion_mnist", "tfds", "image_folder")
CROPS = ("random_resized", "resize_pad_crop")


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


FASHION_MNIST_MEAN = (0.2860,)  # over the 60000 training images


FASHION_MNIST_STD = (0.3530,)


_RGB_DEFAULTS = dict(
    image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_crop_pct=0.875, crop_resampler="opencv"
)


_SOURCE_DEFAULTS = {
    "fashion_mnist": dict(
        path=sources.FASHION_MNIST_DIR,
        eval_split="test",
        image_size=28,
        channels=1,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        eval_crop_pct=1.0,  # 28x28 images evaluated as they are
    ),
    "tfds": dict(name="imagenet2012", eval_split="validation", **_RGB_DEFAULTS),
    "image_folder": dict(eval_split="val", **_RGB_DEFAULTS),  # MAE's <path>/{train,val}/<class>/ layout
}


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The data section of an experiment config; defaults depend on ``source``.

    Keys:
      source: ``'fashion_mnist'`` (default) | ``'tfds'`` | ``'image_folder'``.
      name: the TFDS dataset (``'imagenet2012'``); tfds only.
      path: fashion_mnist: the directory of the IDX files (Debian's
        ``/usr/share/datasets/fashion-mnist``); image_folder: the directory
        holding one folder per split, each ``<class_name>/*.{jpg,jpeg,png}``.
      data_dir: TFDS's data directory (``None``: TFDS's default).
      split, eval_split: ``'train'`` and ``'test'`` (fashion_mnist),
        ``'validation'`` (tfds), ``'val'`` (image_folder).
      image_size, channels: 28 and 1 for fashion_mnist, else 224 and 3.
      mean, std: per-channel normalisation of ``[0, 1]`` pixels.
      crop: the training crop: ``'random_resized'`` (MAE's RandomResizedCrop,
        ``crop_scale`` and ``crop_ratio``) or ``'resize_pad_crop'`` (MFF's: the
        shorter side resized to ``image_size``, padded by ``crop_padding`` pixels
        by reflection and cut at random, ``transforms.ResizePadCropFlip``).
      crop_scale, crop_ratio: RandomResizedCrop's area fraction ``(0.2, 1.0)``
        and aspect-ratio range ``(3/4, 4/3)`` (MAE's).
      flip: random horizontal flip.
      crop_resampler: how the random crop is resized (antialiased bicubic):
        ``'opencv'`` (tfds, image_folder; several times faster, close to
        Pillow's result) or ``'pillow'`` (fashion_mnist; Pillow's own, as MAE's
        torchvision transform); see ``transforms``' module docstring. Configs
        saved without the key read as ``'pillow'``.
      jpeg_decoder: ``'simplejpeg'`` (default: libjpeg-turbo without Pillow's
        overhead, the same pixels) or ``'pillow'``; non-JPEG files always go
        through Pillow.
      device_normalize: True (default): batches carry ``images`` as uint8
        pixels and the device normalises them with
        ``transforms.normalize_images`` (4x fewer bytes to the accelerator, no
        host time). False: float32 normalised on the host. Random erasing
        (``random_erase_prob > 0``) needs normalised pixels, so with it the
        host normalises anyway.
      rand_augment: ``None`` (off) or timm's RandAugment string, MAE's
        fine-tuning ``'rand-m9-mstd0.5-inc1'`` (``augment.rand_augment_from_string``);
        geometric ops fill with ``round(255 * mean)``, as timm's ``create_transform``.
      random_erase_prob: probability of timm's random erasing (``mode='pixel'``)
        of each normalised training image (on the host, so training batches
        are then float32, normalised); 0 (off), MAE's fine-tuning 0.25.
      eval_crop_pct: evaluation resizes the shorter side to
        ``image_size / eval_crop_pct`` and crops the centre (MAE: 0.875; 1.0
        for fashion_mnist, where evaluation is the identity).
      num_workers: 0 computes batches in this process; > 0 in that many grain
        worker processes (``mp_prefetch``).
      num_threads: grain read threads per process (0: none; batches are
        computed on demand, best when pinned to one core).
      prefetch_buffer_size: batches buffered per process (and per worker).
      seed: the pipeline seed: shuffling, augmentation and token sets.
    """
    values = data_defaults(overrides.get("source", "fashion_mnist"))
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(values)}.")
    # An override of None keeps a placeholder's type (so the command line can still set it).
    kept = {
        k: v for k, v in overrides.items() if v is not None or not isinstance(values[k], config_dict.FieldReference)
    }
    config = ml_collections.ConfigDict(values | kept)
    check_config(config)
    return config


def data_defaults(source: str = "fashion_mnist") -> dict:
    """Every key of ``source``'s data section with its default, unchecked (``data_config`` adds the overrides
    and checks them); ``config_validation`` compares data sections with these keys."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}.")
    values = dict(
        source=source,
        # None unless the source sets them; typed placeholders, so --config.data.path=... can set them.
        name=config_dict.placeholder(str),
        path=config_dict.placeholder(str),
        data_dir=config_dict.placeholder(str),
        split="train",
        eval_split="test",
        crop="random_resized",  # or 'resize_pad_crop': MFF's resize, padded random crop
        crop_padding=4,
        crop_scale=(0.2, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip=True,
        crop_resampler="pillow",
        jpeg_decoder="simplejpeg",
        device_normalize=True,
        rand_augment=config_dict.placeholder(str),  # None; typed so that --config.data.rand_augment=... works
        random_erase_prob=0.0,
        num_workers=0,
        num_threads=0,
        prefetch_buffer_size=2,
        seed=0,
    )
    return values | _SOURCE_DEFAULTS[source]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` for a data config that cannot work: one line naming the key, its value and the fix.

    Checks values only, never the disk (a config may be built where its data is not); ``check_split`` checks a
    split's files.
    """
    if config.source not in SOURCES:
        raise ValueError(f"unknown data source {config.source!r}; choose one of {SOURCES} for --config.data.source.")
    if config.source == "tfds" and not config.name:
        raise ValueError("source='tfds' needs data.name, the TFDS dataset name; set --config.data.name=imagenet2012.")
    if config.source == "image_folder" and not config.path:
        raise ValueError(
            "source='image_folder' needs data.path, the directory holding <split>/<class_name>/*.jpg; "
            "set --config.data.path."
        )
    if config.channels not in (1, 3):
        raise ValueError(
            f"data.channels={config.channels!r}: images are read as grayscale (1) or RGB (3); set --config.data.channels."
        )
    if not len(config.mean) == len(config.std) == config.channels:
        raise ValueError(
            f"data.mean={tuple(config.mean)} and data.std={tuple(config.std)} need one entry per channel "
            f"(data.channels={config.channels}); set --config.data.mean and --config.data.std "
            f"(ImageNet's: '{IMAGENET_MEAN}' and '{IMAGENET_STD}')."
        )
    if not all(s > 0 for s in config.std):
        raise ValueError(f"data.std={tuple(config.std)} must be positive; set --config.data.std.")
    if not (isinstance(config.image_size, int) and config.image_size >= 1):
        raise ValueError(
            f"data.image_size={config.image_size!r} must be a positive integer; set --config.data.image_size."
        )
    low, high = config.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"data.crop_scale={tuple(config.crop_scale)} must satisfy 0 < low <= high <= 1; set --config.data.crop_scale."
        )
    low, high = config.crop_ratio
    if not 0.0 < low <= high:
        raise ValueError(
            f"data.crop_ratio={tuple(config.crop_ratio)} must satisfy 0 < low <= high; set --config.data.crop_ratio."
        )
    if not 0.0 < config.eval_crop_pct <= 1.0:
        raise ValueError(
            f"data.eval_crop_pct={config.eval_crop_pct} must lie in (0, 1]; set --config.data.eval_crop_pct."
        )
    if config.get("rand_augment") is not None:
        try:
            augment.rand_augment_from_string(config.rand_augment)
        except ValueError as error:
            raise ValueError(f"data.rand_augment: {error} None turns RandAugment off.") from error
    if not 0.0 <= config.get("random_erase_prob", 0.0) <= 1.0:
        raise ValueError(
            f"data.random_erase_prob={config.random_erase_prob} must lie in [0, 1] (0 turns erasing off); "
            "set --config.data.random_erase_prob."
        )
    for key, minimum in (("num_workers", 0), ("num_threads", 0), ("prefetch_buffer_size", 1), ("seed", 0)):
        value = config.get(key, minimum)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(
                f"data.{key}={value!r} must be an integer >= {minimum}; set --config.data.{key}"
                + (" (0: read in this process)." if key == "num_workers" else ".")
            )
    if config.get("crop", "random_resized") not in CROPS:
        raise ValueError(f"data.crop={config.crop!r}; choose one of {CROPS} for --config.data.crop.")
    if not (isinstance(config.get("crop_padding", 0), int) and config.get("crop_padding", 0) >= 0):
        raise ValueError(f"data.crop_padding={config.crop_padding!r} must be an integer >= 0 (pixels of reflection).")
    if crop_resampler(config) not in transforms.CROP_RESAMPLERS:
        raise ValueError(f"data.crop_resampler={config.crop_resampler!r}; choose one of {transforms.CROP_RESAMPLERS}.")
    if jpeg_decoder(config) not in transforms.JPEG_DECODERS:
        raise ValueError(f"data.jpeg_decoder={config.jpeg_decoder!r}; choose one of {transforms.JPEG_DECODERS}.")


def check_split(config: ml_collections.ConfigDict, split: str, key: str = "data.split") -> None:
    """Raises ``ValueError`` naming ``key`` (the config key that chose ``split``) when ``split`` cannot be read.

    Without reading any image: Fashion-MNIST has ``train`` and ``test``; an image
    folder needs ``<path>/<split>/`` (the error lists the folders it has); a TFDS
    split is checked when the dataset is opened. A ``key`` without a dot is a key of
    the evaluator section whose error names it.
    """
    where = f"--config.{key}" if "." in key else f"the evaluator's {key}"
    if config.source == "fashion_mnist" and split not in sources.FASHION_MNIST_SPLITS:
        raise ValueError(f"{key}={split!r} is not a Fashion-MNIST split; set {where} to 'train' or 'test'.")
    if config.source == "image_folder":
        root = pathlib.Path(config.path)
        if not root.is_dir():
            raise ValueError(
                f"data.path={config.path!r} is not a folder; set --config.data.path to the folder holding "
                "<split>/<class_name>/ images (MAE's layout: train/ and val/)."
            )
        if not (root / split).is_dir():
            folders = sorted(d.name for d in root.iterdir() if d.is_dir())
            raise ValueError(
                f"{key}={split!r}: the image folder has no {root / split}/; set {where} to one of its "
                f"folders {folders}, or add that folder."
            )


def split_size(config: ml_collections.ConfigDict, split: str, at_most: int | None = None) -> int | None:
    """How many images ``split`` holds, counting no further than ``at_most``; None where that needs the data
    opened (TFDS). Reads Fashion-MNIST's IDX header and lists an image folder, without decoding anything."""
    if config.source == "fashion_mnist":
        return sources.FashionMnistSource(config.path, split).num_examples()
    if config.source == "image_folder":
        return sources.count_images(pathlib.Path(config.path) / split, at_most)
    return None


# Configs saved before these keys existed: Pillow's crops (what those runs used), simplejpeg (the same
# pixels as Pillow's decoder), uint8 batches (the steps normalise whatever they get).
def crop_resampler(config: ml_collections.ConfigDict) -> str:
    return config.get("crop_resampler", "pillow")


def jpeg_decoder(config: ml_collections.ConfigDict) -> str:
    return config.get("jpeg_decoder", "simplejpeg")
