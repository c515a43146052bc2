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

import grain
import ml_collections
import numpy as np
from absl import flags

from prmim_jax import masking, masking_transforms
from prmim_jax.data import augment, schema, sources, transforms


def _normalize_on_host(config: ml_collections.ConfigDict, random_erasing: bool = False) -> bool:
    """Whether the pipeline normalises: ``device_normalize`` off, or random erasing, which needs normalised pixels."""
    return not config.get("device_normalize", True) or random_erasing


def in_process(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` for a short evaluation pass: read in this process, so no worker processes outlive it."""
    return ml_collections.ConfigDict(config.to_dict() | {"num_workers": 0})


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


def _augmented_stream(
    config: ml_collections.ConfigDict, seeds: dict[str, int], element_info: bool = False
) -> grain.MapDataset:
    """The endless training stream of elements ``{'image': [S, S, C], 'label': int}``, ``S = image_size``.

    ``'image'`` is uint8 pixels, or float32 normalised when the host normalises
    (``_normalize_on_host``). source -> shuffle -> repeat -> decode -> random
    resized crop + flip -> [RandAugment] -> [normalize] -> [random erasing]. The random maps act before
    any per-process split, so their element index (and hence their randomness)
    is the position in the global stream. Configs saved before
    ``rand_augment`` / ``random_erase_prob`` existed read as both off. ``element_info`` adds
    ``'index'`` (the source position, ``transforms.AttachIndex``) and ``'crop'``
    (``RandomResizedCropFlip``'s box and flip); the images are the same either way.
    """
    if config.get("crop", "random_resized") == "resize_pad_crop":  # configs saved before the key: MAE's
        crop = transforms.ResizePadCropFlip(config.image_size, config.crop_padding, config.flip, record=element_info)
    else:
        crop = transforms.RandomResizedCropFlip(
            config.image_size,
            tuple(config.crop_scale),
            tuple(config.crop_ratio),
            config.flip,
            schema.crop_resampler(config),
            record=element_info,
        )
    ds = grain.MapDataset.source(make_source(config, config.split))
    if element_info:
        ds = ds.map_with_index(transforms.AttachIndex(len(ds)))
    ds = ds.shuffle(seed=seeds["shuffle"]).repeat()
    ds = ds.map(transforms.DecodeImage(config.channels, schema.jpeg_decoder(config)))
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
    ``element_info``: every element also carries ``'index'`` (its position in
    the source) and ``'crop'`` (``[5] float32``, its crop box and flip), so
    the batch has ``'index' [B]`` and ``'crop' [B, 5]`` (per-image state that
    follows the augmentation: AMT's attention maps).
    """

    per_example: grain.transforms.RandomMap | None = None
    per_batch: grain.transforms.Map | None = None
    element_info: bool = False


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
    ds = _augmented_stream(config, seeds, host.element_info)
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
    host = HostTransforms(masking_transforms.DrawTokenNoise(layout), masking_transforms.SampleTokens(sampler, layout))
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
    whole_image: bool = False,
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
    ``whole_image`` squashes each whole image to ``image_size`` instead
    (``transforms.ResizeWhole``, AMT's map pass). Image ``i`` of the split is
    row ``i % b`` of process ``(i % batch_size) // b``'s batch ``i // batch_size``.
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
    ds = ds.map(transforms.DecodeImage(config.channels, schema.jpeg_decoder(config)))
    if whole_image:
        ds = ds.map(transforms.ResizeWhole(config.image_size))
    else:
        ds = ds.map(transforms.ResizeCenterCrop(config.image_size, config.eval_crop_pct))
    if _normalize_on_host(config):
        ds = ds.map(transforms.Normalize(tuple(config.mean), tuple(config.std)))
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
    ds = ds.map(transforms.EvalBatch())
    return _to_iter_dataset(ds, config)
