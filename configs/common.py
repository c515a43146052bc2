"""What the experiment configs share (big_vision's ``configs/common.py``): their argument, the loop of every
Fashion-MNIST and every ImageNet-1K experiment, and the sections they build alike.

A config names its model and method and what it changes; the rest comes from here::

    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    config = common.fmnist_pretraining(options, model=..., method=...)

``runlocal`` shrinks any of them to a run of seconds on a laptop (big_vision's habit).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from prmim_jax import base_config, config_args, optim, sharding
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import classify

IMAGENET_TRAIN_IMAGES = 1_281_167  # TFDS imagenet2012's train split
# optimizer.no_decay of recipes that weight-decay every parameter of two or more dimensions (timm 0.3.2's
# add_weight_decay, MAE's, LocalMIM's and TEC's pretraining): the cls and mask tokens are decayed.
ONE_DIMENSIONAL = (optim.ONE_DIMENSIONAL,)

# The arguments of every config that pretrains a framework with a thrown set (``throwing``): PR-MIM's keys.
THROWING_ARGS = dict(reconstruction="full", sampler=str, throw=float)
# ... of every Fashion-MNIST pretraining: a short run, its length and seed.
FMNIST_ARGS = dict(runlocal=False, steps=int, seed=0)
# ... of every ImageNet-1K pretraining: a short run, the epochs (None: the recipe's), FSDP.
IN1K_ARGS = dict(runlocal=False, epochs=int, fsdp=False)


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """The config's argument read against ``spec`` (``config_args.parse``: unknown names are refused)."""
    return config_args.parse(arg, **spec)


def throwing(options: ml_collections.ConfigDict) -> dict:
    """Method-section keys from the arguments: ``reconstruction`` (where the config takes it), and ``sampler`` /
    ``throw`` (rho_d) where given."""
    overrides = {"reconstruction": options.reconstruction} if "reconstruction" in options else {}
    if options.sampler is not None:
        overrides["sampler"] = options.sampler
    if options.throw is not None:
        overrides["throw_ratio"] = options.throw
    return overrides


def mesh(fsdp: bool) -> ml_collections.ConfigDict:
    """Data parallelism, or FSDP over every device (parameters and optimizer state split along ``embed``)."""
    return sharding.sharding_config(mesh=(("data", 1), ("fsdp", -1)) if fsdp else (("data", -1), ("fsdp", 1)))


def evals(**sections) -> ml_collections.ConfigDict:
    """``config.evals`` from ``name=evaluator section`` pairs."""
    return ml_collections.ConfigDict(sections)


def fmnist_pretraining(
    options: ml_collections.ConfigDict,
    *,
    model: ml_collections.ConfigDict,
    method: ml_collections.ConfigDict,
    optimizer: dict | None = None,
    data: dict | None = None,
    pictures: bool = True,
) -> ml_collections.ConfigDict:
    """A Fashion-MNIST pretraining (``FMNIST_ARGS``): batch 128 for ``options.steps`` (500) steps, AdamW
    at base lr 1.5e-3 (``optimizer`` overrides ``optim.optimizer_config``) with a tenth of warmup, kNN on 5000 /
    2000 images at the end, a checkpoint (and a reconstruction picture, with ``pictures``) every 250 steps.
    ``runlocal``: 40 steps of 64."""
    steps = options.steps or 500
    config = base_config.experiment_config(
        seed=options.seed,
        batch_size=128,
        total_steps=steps,
        model=model,
        method=method,
        optimizer=optim.optimizer_config(
            **dict(base_lr=1.5e-3, warmup_steps=steps // 10, weight_decay=0.05) | (optimizer or {})
        ),
        data=schema.data_config(source="fashion_mnist", **(data or {})),
        sharding=sharding.sharding_config(),
        evals=evals(knn=eval_config("knn", every=0, k=20, train_examples=5000, test_examples=2000, batch_size=512)),
        log_every=50,
        checkpoint_every=250,
    )
    if pictures:
        config.evals.reconstruction = eval_config("reconstruction", every=250)
    if options.runlocal:
        config.update(total_steps=options.steps or 40, batch_size=64, log_every=10, checkpoint_every=20)
        config.optimizer.warmup_steps = 5
        config.evals.knn.update(train_examples=1000, test_examples=500)
        if pictures:
            config.evals.reconstruction.every = 20
    return config


def imagenet_data(**overrides) -> ml_collections.ConfigDict:
    """TFDS's ``imagenet2012`` (ArrayRecord, through ``tfds.data_source``), 16 grain workers per process."""
    return schema.data_config(
        **dict(source="tfds", name="imagenet2012", split="train", eval_split="validation", num_workers=16) | overrides
    )


def in1k_pretraining(
    options: ml_collections.ConfigDict,
    *,
    model: ml_collections.ConfigDict,
    method: ml_collections.ConfigDict,
    batch_size: int,
    epochs: int,
    warmup_epochs: int,
    optimizer: dict,
    data: dict | None = None,
    pictures: bool = True,
) -> ml_collections.ConfigDict:
    """An ImageNet-1K pretraining (``IN1K_ARGS``) of ``options.epochs`` (else ``epochs``) at ``batch_size``:
    ``optimizer`` (``optim.optimizer_config``'s keys, ``decay_epochs`` for a multistep schedule's
    ``decay_steps``) with ``warmup_epochs`` of warmup, kNN on 50000 / 10000 images every 10 epochs, a picture
    every 5 (with ``pictures``), a checkpoint every 2. ``runlocal``: ``run_locally``."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch_size
    optimizer = dict(optimizer)
    decay_steps = tuple(e * steps_per_epoch for e in optimizer.pop("decay_epochs", ()))
    config = base_config.experiment_config(
        batch_size=batch_size,
        total_steps=(options.epochs or epochs) * steps_per_epoch,
        model=model,
        method=method,
        optimizer=optim.optimizer_config(
            warmup_steps=warmup_epochs * steps_per_epoch, decay_steps=decay_steps, **optimizer
        ),
        data=imagenet_data(**(data or {})),
        sharding=mesh(options.fsdp),
        evals=evals(
            knn=eval_config(
                "knn", every=10 * steps_per_epoch, k=20, train_examples=50000, test_examples=10000, batch_size=1024
            )
        ),
        log_every=100,
        checkpoint_every=2 * steps_per_epoch,
    )
    if pictures:
        config.evals.reconstruction = eval_config("reconstruction", every=5 * steps_per_epoch)
    return config


# ``runlocal`` of an ImageNet-1K experiment: Fashion-MNIST-sized images (28 x 28, one channel) and a tiny model of
# the experiment's family, the same for a pretraining and the fine-tuning that starts from it.
RUNLOCAL_VIT = dict(variant="Ti/2", width=32, depth=2, num_heads=4, image_size=28, channels=1, dtype="float32")
RUNLOCAL_DECODER = dict(decoder_width=16, decoder_depth=1, decoder_num_heads=2)
RUNLOCAL_SWIN = dict(
    variant="T",
    width=32,
    depths=(2, 2),
    num_heads=(2, 4),
    patch_size=2,
    window_size=7,
    image_size=28,
    channels=1,
    dtype="float32",
)
# The augmentations an ImageNet experiment keeps when it runs locally: what its recipe does to each image.
AUGMENTATION_KEYS = ("crop", "crop_padding", "crop_scale", "crop_ratio", "flip", "rand_augment", "random_erase_prob")


def run_locally(config: ml_collections.ConfigDict, **model: object) -> ml_collections.ConfigDict:
    """``config`` shrunk to a run of seconds anywhere (``runlocal``): Fashion-MNIST with the recipe's
    augmentations, ``config.model`` updated with ``model`` (a ``RUNLOCAL_*`` size), 10 steps of 16 in this
    process, a line and a checkpoint every 5, every evaluator at the end on a few images."""
    augmentation = {key: config.data[key] for key in AUGMENTATION_KEYS if key in config.data}
    config.data = schema.data_config(source="fashion_mnist", **augmentation)
    config.model.update(model)
    if "num_classes" in config.model:  # a classifier: Fashion-MNIST's ten classes
        config.model.num_classes = 10
    config.update(batch_size=16, total_steps=10, log_every=5, checkpoint_every=5)
    config.optimizer.warmup_steps = 2
    if config.optimizer.get("decay_steps"):  # a multistep schedule keeps one step down, after step 6 of 10
        config.optimizer.decay_steps = (6,)
    for name in list(config.evals):
        section = config.evals[name]
        if section.type == "robustness":  # ImageNet's variants have no Fashion-MNIST-sized stand-in
            del config.evals[name]
            continue
        section.every = 0
        if "batch_size" in section:
            section.batch_size = 16
        if section.type == "knn":
            section.update(k=5, train_examples=64, test_examples=32)
    return config


def finetuning(
    *,
    model: ml_collections.ConfigDict,
    optimizer: ml_collections.ConfigDict,
    data: ml_collections.ConfigDict,
    batch_size: int,
    total_steps: int,
    log_every: int,
    checkpoint_every: int,
    mixing: ml_collections.ConfigDict | None = None,
    accuracy: dict | None = None,
    seed: int = 0,
    fsdp: bool = False,
) -> ml_collections.ConfigDict:
    """A classifier's training (``method.name='classify'``): fine-tuning, partial fine-tuning or linear probing of
    the encoder named at run time (``--config.init.workdir``, ``init.checkpoint``), with the top-1
    ``accuracy`` evaluator (its section's keys) and ``mixing`` (default: Table 14's mixup / cutmix)."""
    return base_config.experiment_config(
        seed=seed,
        batch_size=batch_size,
        total_steps=total_steps,
        model=model,
        method=classify.default_config(),
        init=classify.init_config(),
        mixing=mixing or classify.mixing_config(),
        optimizer=optimizer,
        data=data,
        sharding=mesh(fsdp),
        evals=evals(accuracy=eval_config("accuracy", **(accuracy or {}))),
        log_every=log_every,
        checkpoint_every=checkpoint_every,
    )


# optimizer.no_decay of the MAE-family fine-tuning (facebookresearch/mae ``util/lr_decay.py`` L27-37: ``p.ndim == 1``
# or timm ViT's ``no_weight_decay()`` = pos_embed, cls_token; mmpretrain's MFF fine-tune: ``.ln``, ``.bias``,
# ``.cls_token``, ``.pos_embed``, the same parameters).
FINETUNING_NO_DECAY = (optim.ONE_DIMENSIONAL, "cls_token", "pos_embedding")
# ImageNet-1K's fine-tuning augmentation (timm's ``create_transform`` as MAE's ``util/datasets.py`` L37-48 calls it):
# random resized crops down to 8 % of the image, RandAugment (9, 0.5) with increasing magnitude, random erasing 0.25.
FINETUNING_AUGMENTATION = dict(crop_scale=(0.08, 1.0), rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25)
# Table 7's robustness benchmarks: ImageNet-C (mCE), -A, -R and -Sketch, read through TFDS.
TABLE7_DATASETS = "imagenet2012_corrupted,imagenet_a,imagenet_r,imagenet_sketch"


@dataclasses.dataclass(frozen=True)
class FinetuningRecipe:
    """A framework's fine-tuning recipe as its official code runs it: ``base_lr`` per 256 images (a recipe given per
    512 is halved; an absolute ``--lr`` divided by ``batch_size / 256``), ``min_lr`` absolute, epochs of ImageNet-1K's
    train split; ``source`` names the file the values were read from."""

    base_lr: float
    layer_decay: float
    drop_path: float
    epochs: int
    warmup_epochs: int
    min_lr: float
    source: str
    batch_size: int = 1024
    grad_clip_norm: float | None = None


def imagenet_finetuning(
    options: ml_collections.ConfigDict,
    recipe: FinetuningRecipe,
    *,
    model: ml_collections.ConfigDict,
    no_decay: tuple[str, ...] = FINETUNING_NO_DECAY,
    train_images: int = IMAGENET_TRAIN_IMAGES,
    data: dict | None = None,
) -> ml_collections.ConfigDict:
    """A fine-tuning of ``recipe`` on ImageNet-1K (``data`` overrides ``imagenet_data``'s keys and ``train_images``
    the epoch's size, for another dataset): ``options.epochs`` (else the recipe's) at the recipe's batch, AdamW
    (0.9, 0.999), weight decay 0.05 except ``no_decay``, layer-wise lr decay, warmup then cosine to ``min_lr``,
    ``FINETUNING_AUGMENTATION``, mixup 0.8 / cutmix 1.0 / label smoothing 0.1 (timm's ``Mixup`` as MAE's
    ``main_finetune.py`` L80-110 sets it), top-1 every 5 epochs, a checkpoint every epoch; ``options.robustness``
    adds Table 7's benchmarks at the end; ``options.runlocal``: ``run_locally`` with ``RUNLOCAL_*`` sizes."""
    steps_per_epoch = train_images // recipe.batch_size
    model.drop_path_rate = recipe.drop_path
    config = finetuning(
        batch_size=recipe.batch_size,
        total_steps=(options.epochs or recipe.epochs) * steps_per_epoch,
        model=model,
        optimizer=optim.classifier_optimizer_config(
            base_lr=recipe.base_lr,
            layer_decay=recipe.layer_decay,
            warmup_steps=recipe.warmup_epochs * steps_per_epoch,
            min_lr=recipe.min_lr,
            grad_clip_norm=recipe.grad_clip_norm,
            no_decay=no_decay,
        ),
        mixing=classify.mixing_config(),
        data=imagenet_data(**FINETUNING_AUGMENTATION | (data or {})),
        accuracy=dict(every=5 * steps_per_epoch, batch_size=1024),
        fsdp=options.get("fsdp", False),
        log_every=100,
        checkpoint_every=steps_per_epoch,
    )
    if options.get("robustness"):
        config.evals.robustness = eval_config("robustness", datasets=TABLE7_DATASETS)
    return config


def run_fmnist_locally(config: ml_collections.ConfigDict, steps: int | None) -> None:
    """``runlocal`` for a Fashion-MNIST classifier: ``steps`` (30) steps of 64, 3 of warmup, a line and a
    checkpoint every 10."""
    config.update(total_steps=steps or 30, batch_size=64, log_every=10, checkpoint_every=10)
    config.optimizer.warmup_steps = 3
