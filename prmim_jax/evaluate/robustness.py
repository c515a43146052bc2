"""Robustness and transfer of a fine-tuned ImageNet classifier: ImageNet-A, -R, -C, -V2, -Sketch, ...

Scoring, and the ``robustness`` evaluator; the command line for a finished run is
``prmim_jax.tools.robustness``.

Every dataset is read through TFDS (prepared beforehand in ArrayRecord form,
``tfds build NAME --file_format=array_record``; nothing is downloaded here) by
``prmim_jax.data.pipeline.eval_dataset``, with the fine-tuning run's
evaluation transform (resize, centre crop, normalisation).

Labels. TFDS's ``imagenet_a``, ``imagenet_r``, ``imagenet_v2``,
``imagenet_sketch`` and ``imagenet2012_corrupted`` builders all declare
``ClassLabel(names_file=imagenet2012/labels.txt)``, the 1000 sorted WordNet ids
of ImageNet-1k, and store each image's wnid through it: their labels are
indices into the 1000-class space of the classifier (checked in
``tensorflow_datasets/datasets/{imagenet_a,imagenet_r}/*_dataset_builder.py``,
tfds 4.9.10). ImageNet-A and -R hold 200 of those classes; following Hendrycks
et al., the classifier is scored on them with its 1000 logits restricted to
the 200 (``class_subset``: the logits of the other 800 classes are set to
-inf before the argmax). Hendrycks' ``eval.py`` takes ``logits[:, subset]``
and compares with 0..199 targets of an ImageFolder over the 200 wnids; as both
orders are sorted by wnid, that is the same prediction.

The 200-class subsets (``IMAGENET_A_CLASSES``, ``IMAGENET_R_CLASSES``: sorted
indices into the 1000 sorted wnids) agree in three sources: the official
``hendrycks/natural-adv-examples/eval.py`` (``thousand_k_to_200``) and
``hendrycks/imagenet-r/eval.py`` (the ``imagenet_r_wnids`` set and its
``imagenet_r_indices`` comment); timm's ``timm/data/_info/imagenet_{a,r}_indices.txt``;
and timm's ``imagenet_a_synsets.txt`` / Hendrycks' ``imagenet_r_wnids``
mapped through TFDS's ``imagenet2012/labels.txt``.

ImageNet-C (Hendrycks & Dietterich 2019). For corruption ``c`` with top-1
errors ``E_{s,c}`` at severities ``s = 1..5``, the corruption error is
``CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet`` and mCE the mean of ``CE_c``
over the 15 benchmark corruptions (``IMAGENET_C_CORRUPTIONS``); AlexNet's
severity-averaged errors are ``ALEXNET_ERRORS``, as in
``google-research/augmix/imagenet.py`` (``ALEXNET_ERR``, "taken from
https://github.com/hendrycks/robustness") and, by corruption name,
open-mmlab/mmpretrain's ``mmcls/evaluation/metrics/corruption_error.py``. The
four extra corruptions (``IMAGENET_C_EXTRA_CORRUPTIONS``) get errors but no
CE: we found AlexNet errors for them in one unofficial script only. TFDS's
``imagenet2012_corrupted/<corruption>_<severity>`` images are already the
224-pixel centre crop (of the 256-pixel resize) that the benchmark uses, so
they are evaluated with ``eval_crop_pct = 1`` (a resize to ``image_size``
only, the identity at 224), as in Hendrycks' ``test.py`` (``CenterCrop(224)``).
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_dict

from prmim_jax import sharding
from prmim_jax.data import pipeline, schema

logger = logging.getLogger(__name__)

PredictFn = Callable[[np.ndarray], np.ndarray]
"""This process's ``images [b, H, W, C] float32`` -> its ``logits [b, num_classes]`` (numpy-convertible)."""

# Sorted indices into ImageNet-1k's sorted wnids (see the module docstring for the sources).
# The 200 classes of ImageNet-A and of ImageNet-R, as sorted indices into the 1000 (module docstring).
_SUBSETS = json.loads((pathlib.Path(__file__).parent / "imagenet_class_subsets.json").read_text())
IMAGENET_A_CLASSES: tuple[int, ...] = tuple(_SUBSETS["imagenet_a"])
IMAGENET_R_CLASSES: tuple[int, ...] = tuple(_SUBSETS["imagenet_r"])
DATASET_CLASS_SUBSETS: dict[str, tuple[int, ...]] = {
    "imagenet_a": IMAGENET_A_CLASSES,
    "imagenet_r": IMAGENET_R_CLASSES,
}

IMAGENET_C = "imagenet2012_corrupted"
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
IMAGENET_C_EXTRA_CORRUPTIONS = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
IMAGENET_C_SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's top-1 error per benchmark corruption, averaged over the five severities.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}

# TFDS's split names; the key is the dataset name before any '/<config>'.
DEFAULT_SPLITS = {
    "imagenet2012": "validation",
    "imagenet2012_real": "validation",
    IMAGENET_C: "validation",
    "imagenet_a": "test",
    "imagenet_r": "test",
    "imagenet_v2": "test",
    "imagenet_sketch": "test",
}


def imagenet_c_name(corruption: str, severity: int) -> str:
    """The TFDS name of one ImageNet-C configuration: ``imagenet2012_corrupted/<corruption>_<severity>``."""
    known = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS
    if corruption not in known:
        raise ValueError(f"unknown ImageNet-C corruption {corruption!r}; known: {known}.")
    if severity not in IMAGENET_C_SEVERITIES:
        raise ValueError(f"ImageNet-C severity {severity!r} must be one of {IMAGENET_C_SEVERITIES}.")
    return f"{IMAGENET_C}/{corruption}_{severity}"


def default_split(name: str) -> str:
    """TFDS's evaluation split of dataset ``name`` (``'imagenet_v2/topimages'`` -> ``'test'``)."""
    base = name.split("/")[0]
    if base not in DEFAULT_SPLITS:
        raise ValueError(f"no default split known for {name!r}; name it as {name}:SPLIT.")
    return DEFAULT_SPLITS[base]


def predictions(logits, class_subset: Sequence[int] | None = None) -> np.ndarray:
    """``logits [b, K]`` -> ``[b] int64`` argmax, over ``class_subset`` only when given.

    Predictions stay indices into the ``K`` classes: with a subset, the logits
    of every other class count as -inf.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, num_classes], got shape {logits.shape}.")
    if class_subset is None:
        return logits.argmax(-1)
    subset = np.asarray(class_subset, np.int64)
    if subset.ndim != 1 or not len(subset) or subset.min() < 0 or subset.max() >= logits.shape[1]:
        raise ValueError(
            f"class_subset must be a non-empty sequence of class indices in [0, {logits.shape[1]}) "
            f"(the logits' width); got {len(subset)} indices in [{subset.min(initial=0)}, {subset.max(initial=0)}]."
        )
    # Argmax over the subset's columns, mapped back: ties go to the lowest class index, as np.argmax's.
    order = np.argsort(subset, kind="stable")
    return subset[order][logits[:, subset[order]].argmax(-1)]


def count_correct(
    predict_fn: PredictFn, batches: Iterable[Mapping[str, np.ndarray]], class_subset: Sequence[int] | None = None
) -> np.ndarray:
    """This process's ``[correct, real examples, real labels outside class_subset]`` int64 over ``batches``.

    Each batch carries ``images [b, H, W, C]``, ``labels [b]`` and ``mask [b]``
    (False on padding rows, which count nowhere). ``predict_fn`` sees every
    batch, padding included, so each process makes the same calls.
    """
    counts = np.zeros(3, np.int64)
    subset = None if class_subset is None else np.asarray(class_subset, np.int64)
    for batch in batches:
        labels = np.asarray(batch["labels"])
        mask = np.asarray(batch["mask"], bool)
        predicted = predictions(predict_fn(batch["images"]), subset)
        if predicted.shape != labels.shape:
            raise ValueError(
                f"predict_fn returned logits for {predicted.shape[0]} images on a batch of {labels.shape[0]}; "
                "it must return this process's logits [b, num_classes]."
            )
        counts[0] += int(np.sum((predicted == labels) & mask))
        counts[1] += int(mask.sum())
        if subset is not None:
            counts[2] += int(np.sum(~np.isin(labels, subset) & mask))
    return counts


def _sum_over_processes(counts: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return counts
    gathered = multihost_utils.process_allgather(counts.astype(np.int32))  # [processes, 3]
    return np.asarray(gathered, np.int64).reshape(jax.process_count(), -1).sum(0)


def evaluate_split(
    predict_fn: PredictFn,
    data_config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int,
    class_subset: Sequence[int] | None = None,
) -> dict:
    """Top-1 accuracy of ``predict_fn`` on ``split`` of the dataset ``data_config`` names.

    Any source ``prmim_jax.data.pipeline`` reads (for TFDS: ``source='tfds'``,
    ``name`` e.g. ``'imagenet_a'`` or ``'imagenet2012_corrupted/fog_3'``);
    ``split`` defaults to ``data_config.eval_split``; ``batch_size`` is the
    global batch. Labels and ``class_subset`` index the same classes as the
    logits (for ImageNet variants, ImageNet-1k's sorted wnids); with a subset,
    the argmax is taken over it (``predictions``).

    Returns ``{'accuracy', 'error', 'correct', 'count'}`` over every process's
    real examples, plus ``'labels_outside_subset'`` (real examples whose label
    the subset lacks, so never right; 0 on ImageNet-A/-R) with a subset.
    """
    batches = pipeline.eval_dataset(
        data_config,
        split,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    correct, count, outside = (int(c) for c in _sum_over_processes(count_correct(predict_fn, batches, class_subset)))
    result = {"accuracy": correct / count, "error": 1.0 - correct / count, "correct": correct, "count": count}
    if class_subset is not None:
        result["labels_outside_subset"] = outside
    return result


def corruption_errors(errors: Mapping[tuple[str, int], float], *, require_all: bool = True) -> dict:
    """ImageNet-C summary of top-1 errors ``{(corruption, severity): error in [0, 1]}``.

    Every corruption present needs all five severities. Returns:

    - ``mean_errors``: ``{corruption: mean error over the severities}``, every
      corruption present (the extra four included);
    - ``ce``: ``{corruption: CE}`` for the benchmark corruptions present,
      ``CE = sum_s E_s / sum_s E_s^AlexNet`` (1.0: as bad as AlexNet);
    - ``mce``: the mean CE over the 15 benchmark corruptions;
    - ``mean_error``: the unnormalised mean of their mean errors.

    ``mce`` and ``mean_error`` are None when some of the 15 are missing and
    ``require_all`` is False.

    Raises:
      ValueError: naming what is missing (severities, or with ``require_all``
        benchmark corruptions), an unknown corruption or severity, or an error
        outside [0, 1].
    """
    by_corruption: dict[str, dict[int, float]] = {}
    known = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS
    for (corruption, severity), error in errors.items():
        if corruption not in known:
            raise ValueError(f"unknown ImageNet-C corruption {corruption!r}; known: {known}.")
        if severity not in IMAGENET_C_SEVERITIES:
            raise ValueError(f"{corruption}: severity {severity!r} is not one of {IMAGENET_C_SEVERITIES}.")
        if not 0.0 <= error <= 1.0:
            raise ValueError(f"{corruption} severity {severity}: error {error} is not a fraction in [0, 1].")
        by_corruption.setdefault(corruption, {})[severity] = float(error)
    incomplete = {
        c: sorted(set(IMAGENET_C_SEVERITIES) - set(by_severity))
        for c, by_severity in by_corruption.items()
        if set(by_severity) != set(IMAGENET_C_SEVERITIES)
    }
    if incomplete:
        listed = "; ".join(f"{c} lacks severities {s}" for c, s in sorted(incomplete.items()))
        raise ValueError(f"CE averages all five severities: {listed}.")
    missing = [c for c in IMAGENET_C_CORRUPTIONS if c not in by_corruption]
    if missing and require_all:
        raise ValueError(f"mCE averages the 15 benchmark corruptions; missing: {missing}.")
    mean_errors = {c: float(np.mean([by_corruption[c][s] for s in IMAGENET_C_SEVERITIES])) for c in by_corruption}
    ce = {c: mean_errors[c] / ALEXNET_ERRORS[c] for c in IMAGENET_C_CORRUPTIONS if c in mean_errors}
    complete = not missing
    return {
        "mean_errors": mean_errors,
        "ce": ce,
        "mce": float(np.mean(list(ce.values()))) if complete else None,
        "mean_error": float(np.mean([mean_errors[c] for c in IMAGENET_C_CORRUPTIONS])) if complete else None,
    }


def with_dataset(
    data_config: ml_collections.ConfigDict | Mapping,
    name: str,
    split: str | None = None,
    data_dir: str | None = None,
    **overrides,
) -> ml_collections.ConfigDict:
    """A copy of ``data_config`` (its image size, normalisation, crop...) reading TFDS dataset ``name``.

    ``split`` (default ``default_split(name)``) becomes ``eval_split``;
    ``data_dir`` replaces the config's when given. ImageNet-C's images are
    already centre-cropped, so its configs get ``eval_crop_pct=1`` unless
    ``overrides`` say otherwise.
    """
    if isinstance(data_config, ml_collections.FrozenConfigDict):
        data_config = data_config.as_configdict()
    values = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(data_config)
    values |= dict(source="tfds", name=name, eval_split=split or default_split(name))
    if data_dir is not None:
        values["data_dir"] = data_dir
    if name.split("/")[0] == IMAGENET_C:
        values["eval_crop_pct"] = 1.0
    config = ml_collections.ConfigDict(values | overrides)
    schema.check_config(config)
    return config


def evaluate_imagenet_c(
    predict_fn: PredictFn,
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
    severities: Sequence[int] = IMAGENET_C_SEVERITIES,
    split: str = "validation",
) -> dict:
    """Runs ``evaluate_split`` on every ``imagenet2012_corrupted/<corruption>_<severity>`` and summarises.

    ``data_config`` gives the transform (image size, normalisation) and
    ``data_dir``; each configuration is read with ``with_dataset``
    (``eval_crop_pct = 1``). Returns ``{'per_config': {'fog_3': evaluate_split's
    dict, ...}}`` and, when ``severities`` are all five, ``corruption_errors``'s
    ``mean_errors``, ``ce``, ``mce`` and ``mean_error`` (None unless all 15
    benchmark corruptions were run); with fewer severities, ``mean_errors``
    over those only and no CE.
    """
    for corruption in corruptions:
        imagenet_c_name(corruption, 1)  # fails early on a typo
    for severity in severities:
        imagenet_c_name(IMAGENET_C_CORRUPTIONS[0], severity)
    per_config, errors = {}, {}
    for corruption in corruptions:
        for severity in severities:
            config = with_dataset(data_config, imagenet_c_name(corruption, severity), split)
            result = evaluate_split(predict_fn, config, split, batch_size=batch_size)
            per_config[f"{corruption}_{severity}"] = result
            errors[corruption, severity] = result["error"]
            logger.info("%s: top-1 error %.2f%%", config.name, 100 * result["error"])
    if set(severities) == set(IMAGENET_C_SEVERITIES):
        summary = corruption_errors(errors, require_all=False)
    else:
        mean_errors = {c: float(np.mean([errors[c, s] for s in severities])) for c in corruptions}
        summary = {"mean_errors": mean_errors, "ce": {}, "mce": None, "mean_error": None}
    return {"per_config": per_config, **summary}


def parse_datasets(spec: str) -> list[tuple[str, str | None]]:
    """``'imagenet_a,imagenet_v2/topimages:test[:10%]'`` -> ``[('imagenet_a', None), ('imagenet_v2/topimages', 'test[:10%]')]``."""
    entries = []
    for item in spec.split(","):
        name, _, split = item.strip().partition(":")
        if not name:
            raise ValueError(f"empty dataset name in {spec!r}; expected NAME[:SPLIT],NAME[:SPLIT],...")
        entries.append((name, split or None))
    return entries


def evaluate_datasets(
    predict_fn: PredictFn,
    data_config: ml_collections.ConfigDict,
    datasets: Sequence[tuple[str, str | None]],
    *,
    batch_size: int,
    data_dir: str | None = None,
) -> dict:
    """``{'name:split': result}`` for each ``(name, split)``; ``imagenet2012_corrupted`` runs the whole ImageNet-C.

    Other names go to ``evaluate_split``, with the 200-class mask of
    ``DATASET_CLASS_SUBSETS`` for ImageNet-A and -R.
    """
    results = {}
    for name, split in datasets:
        split = split or default_split(name)
        if name == IMAGENET_C:
            config = with_dataset(data_config, name, split, data_dir)
            result = evaluate_imagenet_c(predict_fn, config, batch_size=batch_size, split=split)
        else:
            config = with_dataset(data_config, name, split, data_dir)
            subset = DATASET_CLASS_SUBSETS.get(name.split("/")[0])
            result = evaluate_split(predict_fn, config, split, batch_size=batch_size, class_subset=subset)
            logger.info("%s:%s: top-1 accuracy %.2f%%", name, split, 100 * result["accuracy"])
        results[f"{name}:{split}"] = result
    return results


def format_table(results: Mapping[str, dict]) -> str:
    """A plain-text table of ``evaluate_datasets``'s results (ImageNet-C: one row per corruption)."""
    lines = [f"{'dataset:split':<54} {'images':>9} {'top-1 acc':>9} {'error':>7} {'CE':>7}"]
    for key, result in results.items():
        if "per_config" not in result:
            line = f"{key:<54} {result['count']:>9} {100 * result['accuracy']:>8.2f}% {100 * result['error']:>6.2f}%"
            lines.append(line)
            continue
        for corruption, error in result["mean_errors"].items():
            runs = [result["per_config"].get(f"{corruption}_{s}") for s in IMAGENET_C_SEVERITIES]
            count = sum(run["count"] for run in runs if run)
            ce = f"{100 * result['ce'][corruption]:>6.1f}%" if corruption in result["ce"] else f"{'-':>7}"
            lines.append(
                f"{key + ' ' + corruption:<54} {count:>9} {100 * (1 - error):>8.2f}% {100 * error:>6.2f}% {ce}"
            )
        if result["mce"] is not None:
            lines.append(
                f"{key + ' mCE / mean error':<54} {'':>9} {'':>9} {100 * result['mean_error']:>6.2f}% "
                f"{100 * result['mce']:>6.1f}%"
            )
    return "\n".join(lines)


def default_config() -> dict:
    """``evals.<name>`` keys: comma-separated TFDS ``datasets`` (``NAME[:SPLIT]``), global ``batch_size``,
    TFDS ``data_dir`` (None: the run's)."""
    return dict(
        every=0, datasets="imagenet_a,imagenet_r,imagenet_v2", batch_size=256, data_dir=config_dict.placeholder(str)
    )


PREDICTS = "logits"  # the method's predict function this evaluator reads (``prmim_jax.methods``)
MISSING = (
    "evaluator 'robustness' needs a classifier but method {method} has no logits; use it with method 'classify', "
    "or remove it from config.evals."
)


class Evaluator:
    """``{'<name>:<split>/accuracy': ...}`` (and ImageNet-C's mCE) of a classifier method during or after training.

    The classifier's variables are gathered whole on every process (as ``prmim_jax.tools.robustness`` reads a
    finished run), and each process scores its part of every dataset.
    """

    def __init__(self, predict_fn, *, data: ml_collections.ConfigDict, section, placement: sharding.Placement):
        del placement  # the variables are gathered whole: each process scores its own rows
        if section.batch_size % jax.process_count():
            raise ValueError(f"robustness batch_size={section.batch_size} must split over the processes; change it.")
        self.data, self.section, self.every = data, section, section.every
        self.datasets = parse_datasets(section.datasets)
        self._apply = jax.jit(predict_fn)
        self.results: dict = {}

    def run(self, variables) -> dict:
        variables = multihost_utils.process_allgather(variables, tiled=True)

        def predict_fn(images):
            return np.asarray(self._apply(variables, images))

        self.results = evaluate_datasets(
            predict_fn,
            self.data,
            self.datasets,
            batch_size=self.section.batch_size,
            data_dir=self.section.data_dir,
        )
        scalars = {}
        for key, result in self.results.items():
            for metric in ("accuracy", "mce", "mean_error"):
                if result.get(metric) is not None:
                    scalars[f"{key}/{metric}"] = float(result[metric])
        return scalars

    def summary(self, results: dict) -> str:
        return format_table(self.results)
