"""What the experiment configs share (big_vision's ``configs/common.py``): their argument, the loop of every
Fashion-MNIST and every ImageNet-1K experiment, and the sections they build alike.

A config names its model and method and what it changes; the rest comes from here::

    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    config = common.fmnist_pretraining(options, model=..., method=...)

``runlocal`` shrinks any of them to a run of seconds on a laptop (big_vision's habit).
"""

from __future__ import annotations

import ml_collections

from prmim_jax import base_config, config_args, optim, sharding
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import classify

IMAGENET_TRAIN_IMAGES = 1_281_167  # TFDS imagenet2012's train split

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
    runlocal_model: ml_collections.ConfigDict,
    method: ml_collections.ConfigDict,
    batch_size: int,
    epochs: int,
    warmup_epochs: int,
    optimizer: dict,
    data: dict | None = None,
    pictures: bool = True,
) -> ml_collections.ConfigDict:
    """An ImageNet-1K pretraining (``IN1K_ARGS``) of ``options.epochs`` (else ``epochs``) at
    ``batch_size``: ``optimizer`` (``optim.optimizer_config``'s keys) with ``warmup_epochs`` of warmup, kNN
    on 50000 / 10000 images every 10 epochs, a picture every 5 (with ``pictures``), a checkpoint every 2.
    ``runlocal``: ``runlocal_model``, 10 steps of 16 in this process."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch_size
    config = base_config.experiment_config(
        batch_size=batch_size,
        total_steps=(options.epochs or epochs) * steps_per_epoch,
        model=model,
        method=method,
        optimizer=optim.optimizer_config(warmup_steps=warmup_epochs * steps_per_epoch, **optimizer),
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
    if options.runlocal:
        config.update(batch_size=16, total_steps=10, log_every=5, checkpoint_every=5)
        config.model = runlocal_model
        config.optimizer.warmup_steps = 2
        config.data.num_workers = 0
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
        if pictures:
            config.evals.reconstruction.every = 5
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
    the encoder named at run time (``--config.init.workdir``, ``init.mae_checkpoint``, ...), with the top-1
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


def run_fmnist_locally(config: ml_collections.ConfigDict, steps: int | None) -> None:
    """``runlocal`` for a Fashion-MNIST classifier: ``steps`` (30) steps of 64, 3 of warmup, a line and a
    checkpoint every 10."""
    config.update(total_steps=steps or 30, batch_size=64, log_every=10, checkpoint_every=10)
    config.optimizer.warmup_steps = 3


def run_in1k_locally(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict | None = None) -> None:
    """``runlocal`` for an ImageNet-1K classifier: ``model`` (default: the ViT's at ``Ti/16``), 10 steps of 16 in
    this process, a line and a checkpoint every 5."""
    config.update(batch_size=16, total_steps=10, log_every=5, checkpoint_every=5)
    if model is None:
        config.model.update(variant="Ti/16")
    else:
        config.model = model
    config.optimizer.warmup_steps = 2
    config.data.num_workers = 0
    config.evals.accuracy.update(every=0, batch_size=16)
