"""The grain pipelines: pretraining batches with token sets, fine-tuning batches, and padded evaluation batches.

Pretraining, per process (``pretrain_dataset``)::

    source -> shuffle(seed) -> repeat -> decode -> random resized crop + flip -> [normalize]
      -> [method's per-example draws] -> batch(b = global_batch / process_count) -> this process's batches
      -> [method's per-batch map] (pretraining: token noise per image, then the batch's token sets)

Fine-tuning, per process (``finetune_dataset``; MAE's Table 14 recipe with
``rand_augment='rand-m9-mstd0.5-inc1'``, ``random_erase_prob=0.25``,
``crop_scale=(0.08, 1.0)``; mixup / cutmix and label smoothing happen on device,
``prmim_jax.mixing``)::

    source -> shuffle(seed) -> repeat -> decode -> random resized crop + flip -> [RandAugment] -> [normalize]
      -> [random erasing] -> batch(b) -> this process's batches

The bracketed steps run when configured (``data.rand_augment``,
``data.random_erase_prob``), in both training pipelines; they are off by default.
``normalize`` runs on the host only with ``data.device_normalize=False`` or
before random erasing: by default batches carry uint8 pixels and the jitted
step normalises them (``transforms.normalize_images``, which passes float
images through).

Every step is a grain ``MapDataset`` transform, so element ``i`` of the
shuffled, repeated stream is computed from ``(seed, i)`` alone (each random
step with its own seed derived from the pipeline seed). The global batch
of step ``s`` is stream elements ``[s G, (s + 1) G)``; process ``p`` reads its
rows ``[p b, (p + 1) b)``, i.e. local batch ``s P + p`` of the stream cut into
runs of ``b``. The processes thus read disjoint parts that together are exactly
what one process would read for the same global batch, with the same crops,
flips, RandAugment ops, erased boxes and token sets (tested).

The iterator of the returned ``grain.IterDataset`` resumes exactly:
``state = iterator.get_state()`` is a small JSON-serialisable dict (the next
batch's index; with ``num_workers > 0`` one entry per worker), and
``iterator.set_state(state)`` on a fresh iterator of the same pipeline yields the
following batches. ``grain.checkpoint.CheckpointSave(iterator)`` /
``CheckpointRestore(iterator)`` put it in an orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from prmim_jax import masking
from prmim_jax.data import augment, sources, transforms

SOURCES = ("fashion_mnist", "tfds", "image_folder")
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
      crop_scale, crop_ratio: RandomResizedCrop's area fraction ``(0.2, 1.0)``
        and aspect-ratio range ``(3/4, 4/3)`` (MAE's).
      flip: random horizontal flip.
      crop_resampler: how the random crop is resized (antialiased bicubic):
        ``'opencv'`` (tfds, image_folder; about 4x faster, PSNR > 44 dB to
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
    if _crop_resampler(config) not in transforms.CROP_RESAMPLERS:
        raise ValueError(f"data.crop_resampler={config.crop_resampler!r}; choose one of {transforms.CROP_RESAMPLERS}.")
    if _jpeg_decoder(config) not in transforms.JPEG_DECODERS:
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
def _crop_resampler(config: ml_collections.ConfigDict) -> str:
    return config.get("crop_resampler", "pillow")


def _jpeg_decoder(config: ml_collections.ConfigDict) -> str:
    return config.get("jpeg_decoder", "simplejpeg")


def _normalize_on_host(config: ml_collections.ConfigDict, random_erasing: bool = False) -> bool:
    """Whether the pipeline normalises: ``device_normalize`` off, or random erasing, which needs normalised pixels."""
    return not config.get("device_normalize", True) or random_erasing


def make_source(config: ml_collections.ConfigDict, split: str):
    """The random-access source of ``split`` (see ``prmim_jax.data.sources``)."""
    if config.source == "fashion_mnist":
        return sources.FashionMnistSource(config.path, split)
    if config.source == "image_folder":
        return sources.ImageFolderSource(os.path.join(config.path, split))
    return sources.TfdsSource(config.name, split, config.data_dir)


def local_batch_size(global_batch: int, process_index: int, process_count: int) -> int:
    """``global_batch // process_count``; raises ``ValueError`` (with the fix) unless it divides evenly."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    if global_batch < 1 or global_batch % process_count:
        nearest = max(process_count, round(global_batch / process_count) * process_count)
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {process_count} processes; "
            f"use a multiple of {process_count} (e.g. {nearest})."
        )
    return global_batch // process_count


# The pipeline's random streams; each random map gets its own seed, derived from the pipeline seed. New
# streams go at the end, so the seeds of the earlier ones (and the batches they give) never change.
_STREAMS = ("shuffle", "crop", "tokens", "rand_augment", "erase")


def _stream_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each of ``_STREAMS``, all from the one pipeline seed."""
    words = np.random.SeedSequence(seed).generate_state(len(_STREAMS))
    return {name: int(word) for name, word in zip(_STREAMS, words, strict=True)}


def _to_iter_dataset(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    )
    if config.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker start-up reads its absl flags; outside an absl app (tests,
            # notebooks, scripts) they keep their defaults.
            flags.FLAGS.mark_as_parsed()
        # Each worker computes every num_workers-th batch; grain interleaves them back in order.
        options = grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_buffer_size
        )
        ds = ds.mp_prefetch(options)
    return ds


def _augmented_stream(config: ml_collections.ConfigDict, seeds: dict[str, int]) -> grain.MapDataset:
    """The endless training stream of elements ``{'image': [S, S, C], 'label': int}``, ``S = image_size``.

    ``'image'`` is uint8 pixels, or float32 normalised when the host normalises
    (``_normalize_on_host``). source -> shuffle -> repeat -> decode -> random
    resized crop + flip -> [RandAugment] -> [normalize] -> [random erasing]. The random maps act before
    any per-process split, so their element index (and hence their randomness)
    is the position in the global stream. Configs saved before
    ``rand_augment`` / ``random_erase_prob`` existed read as both off.
    """
    crop = transforms.RandomResizedCropFlip(
        config.image_size, tuple(config.crop_scale), tuple(config.crop_ratio), config.flip, _crop_resampler(config)
    )
    ds = grain.MapDataset.source(make_source(config, config.split))
    ds = ds.shuffle(seed=seeds["shuffle"]).repeat()
    ds = ds.map(transforms.DecodeImage(config.channels, _jpeg_decoder(config)))
    ds = ds.random_map(crop, seed=seeds["crop"])
    if config.get("rand_augment") is not None:
        # timm's create_transform fills with the dataset mean in 0..255 (MAE: (124, 116, 104)).
        fill = tuple(min(255, round(255 * m)) for m in config.mean)
        rand_augment = augment.rand_augment_from_string(config.rand_augment, fill=fill)
        ds = ds.random_map(rand_augment, seed=seeds["rand_augment"])
    random_erasing = config.get("random_erase_prob", 0.0) > 0
    if _normalize_on_host(config, random_erasing):
        ds = ds.map(transforms.Normalize(tuple(config.mean), tuple(config.std)))
    if random_erasing:
        ds = ds.random_map(augment.RandomErasing(config.random_erase_prob), seed=seeds["erase"])
    return ds


@dataclasses.dataclass(frozen=True)
class HostTransforms:
    """A method's host-side work in ``train_dataset`` (``prmim_jax.methods`` methods provide one).

    ``per_example``: a grain ``RandomMap`` on one augmented element
    ``{'image': [H, W, C], 'label': int}`` adding the method's per-image draws
    (its own seeded stream, so an image's draw depends on its position in the
    global stream only), or None. ``per_batch``: a grain ``Map`` on the batch
    ``{'images': [B, H, W, C], 'labels': [B] int32, <per_example's arrays,
    stacked>}`` returning the training batch (named arrays), or None.
    """

    per_example: grain.transforms.RandomMap | None = None
    per_batch: grain.transforms.Map | None = None


@dataclasses.dataclass(frozen=True)
class _TrainingBatch(grain.transforms.Map):
    """A batch of elements -> ``{'images': [B, H, W, C], 'labels': [B] int32, <any other arrays as they are>}``."""

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        return {"images": batch.pop("image"), "labels": np.asarray(batch.pop("label"), np.int32), **batch}


def train_dataset(
    config: ml_collections.ConfigDict,
    host: HostTransforms,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> grain.IterDataset:
    """This process's endless training batches for a method's ``host`` transforms (see the module docstring).

    Each batch, with ``b = global_batch // process_count``: ``images [b,
    image_size, image_size, channels]`` uint8 pixels (``data.device_normalize``,
    the default: normalise on device with ``transforms.normalize_images``) or
    float32 normalised (``device_normalize=False``, or random erasing;
    RandAugment and random erasing when configured), ``labels [b] int32``, and whatever the
    method's ``host.per_batch`` adds (``pretrain_dataset``: the token sets).

    ``seed`` (default ``config.seed``) fixes everything: the order of every
    epoch (each epoch reshuffled), crops, flips, the method's draws and the
    augmentations. Process ``p`` gets rows ``[p b, (p + 1) b)`` of the batch one
    process would read, and ``get_state`` / ``set_state`` resume exactly.
    Mixup / cutmix happen on device (``prmim_jax.mixing``).

    Raises:
      ValueError: ``global_batch`` not divisible by ``process_count``.
    """
    local_batch = local_batch_size(global_batch, process_index, process_count)
    seeds = _stream_seeds(config.seed if seed is None else seed)
    ds = _augmented_stream(config, seeds)
    if host.per_example is not None:
        ds = ds.random_map(host.per_example, seed=seeds["tokens"])
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
    ds = ds.map(_TrainingBatch())
    if host.per_batch is not None:
        ds = ds.map(host.per_batch)
    return _to_iter_dataset(ds, config)


def pretrain_dataset(
    config: ml_collections.ConfigDict,
    layout: masking.TokenLayout,
    sampler: str,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> grain.IterDataset:
    """``train_dataset`` with token sets: batches add ``ids_visible`` / ``ids_decoded`` / ``ids_thrown``
    (``[b, N_vis]`` / ``[b, N_dec]`` / ``[b, N_thr] int32``), ``sampler``'s sets for ``layout``
    (``prmim_jax.masking``), drawn from per-image noise.

    Raises:
      ValueError: as ``train_dataset``, and for an unknown sampler or one that
        cannot serve ``layout``, or an image size that the token grid does not divide.
    """
    if config.image_size % layout.grid[0] or config.image_size % layout.grid[1]:
        raise ValueError(f"image_size={config.image_size} is not divisible by the token grid {layout.grid}.")
    host = HostTransforms(transforms.DrawTokenNoise(layout), transforms.SampleTokens(sampler, layout))
    return train_dataset(
        config,
        host,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )


def finetune_dataset(
    config: ml_collections.ConfigDict,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> grain.IterDataset:
    """``train_dataset`` with nothing of a method's: ``images`` and ``labels`` (fine-tuning, linear probing)."""
    return train_dataset(
        config,
        HostTransforms(),
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )


@dataclasses.dataclass(frozen=True)
class _WithMask(grain.transforms.Map):
    real: bool

    def map(self, element: dict) -> dict:
        return element | {"mask": self.real}


def eval_dataset(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """One deterministic pass over ``split`` (default ``config.eval_split``), unshuffled and unaugmented.

    ``batch_size`` is the global batch, as ``pretrain_dataset``'s: process ``p``
    gets rows ``[p b, (p + 1) b)`` of every global batch, ``b = batch_size //
    process_count``. Each batch: ``images [b, image_size, image_size,
    channels]`` (``ResizeCenterCrop``; uint8 pixels, or float32 normalised on
    the host with ``data.device_normalize=False``), ``labels [b] int32``,
    ``mask [b] bool``. The data is padded to a whole number of
    global batches with copies of its first image, ``mask`` False, so every
    batch has one shape and every process the same number of batches.
    """
    local_batch = local_batch_size(batch_size, process_index, process_count)
    split = config.eval_split if split is None else split
    ds = grain.MapDataset.source(make_source(config, split))
    size = len(ds)
    if size == 0:
        raise ValueError(f"split {split!r} of {config.source} is empty.")
    padding = math.ceil(size / batch_size) * batch_size - size
    ds = ds.map(_WithMask(True))
    if padding:
        ds = grain.MapDataset.concatenate([ds, ds[:1].repeat(padding).map(_WithMask(False))])
    ds = ds.map(transforms.DecodeImage(config.channels, _jpeg_decoder(config)))
    ds = ds.map(transforms.ResizeCenterCrop(config.image_size, config.eval_crop_pct))
    if _normalize_on_host(config):
        ds = ds.map(transforms.Normalize(tuple(config.mean), tuple(config.std)))
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
    ds = ds.map(transforms.EvalBatch())
    return _to_iter_dataset(ds, config)
