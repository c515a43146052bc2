"""Pretraining: mesh, sharded state (created or restored), the loop, and its periodic work.

``train_and_evaluate(config, workdir)`` is the whole job; ``main.py`` only parses
flags and calls it. Everything a bad config can get wrong is checked by
``validate`` before anything compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import pathlib

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from prmim_jax import checkpoint, loop, methods, optim, sharding, train_step
from prmim_jax.data import pipeline
from prmim_jax.evaluate import knn, reconstruction
from prmim_jax.metrics import MetricWriter
from prmim_jax.models import mae as mae_lib


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with MAE's defaults; experiment configs start here and override."""
    return ml_collections.ConfigDict(
        dict(
            task="pretrain",  # main.py runs this trainer; fine-tuning configs say "finetune"
            seed=0,
            batch_size=4096,
            total_steps=1000,
            model=mae_lib.model_config("B/16"),
            method=methods.method_config("prmim"),
            optimizer=optim.optimizer_config(),
            data=pipeline.data_config(),
            sharding=sharding.sharding_config(),
            knn=ml_collections.ConfigDict(
                dict(every=0, k=20, temperature=0.07, train_examples=10000, test_examples=10000, batch_size=256)
            ),
            log_every=50,
            stop_after=0,  # > 0: save and stop after this many steps in this invocation (scheduler time limits)
            checkpoint_every=1000,
            keep_checkpoints=3,
            picture_every=1000,
        )
    )


NonFiniteLossError = loop.NonFiniteLossError  # raised by the loop; importable from here too


@dataclasses.dataclass(frozen=True)
class Setup:
    model: nn.Module
    method: methods.Method
    mesh: jax.sharding.Mesh
    rules: tuple
    global_batch: int
    local_batch: int


def validate(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Builds model, method and mesh from ``config``; raises ``ValueError`` with the fix on any impossibility."""
    model, method = methods.build(config.model, config.method)
    mesh = sharding.make_mesh(config.sharding, devices)
    rules = sharding.rules(config.sharding)
    batch = config.batch_size
    ways = sharding.batch_divisor(mesh, rules)
    if batch % jax.process_count():
        raise ValueError(
            f"batch_size={batch} must be divisible by the {jax.process_count()} processes; change batch_size."
        )
    if batch % ways:
        raise ValueError(
            f"batch_size={batch} must be divisible by the {ways} devices the batch is split over "
            f"(mesh {dict(mesh.shape)}); change batch_size or sharding.mesh."
        )
    if config.data.image_size != config.model.image_size or config.data.channels != config.model.channels:
        raise ValueError(
            f"data gives {config.data.image_size}px x {config.data.channels} channels but the model expects "
            f"{config.model.image_size}px x {config.model.channels}; make data.image_size/channels match model."
        )
    if config.knn.batch_size % ways or config.knn.batch_size % jax.process_count():
        raise ValueError(
            f"knn.batch_size={config.knn.batch_size} must be divisible by the {ways} devices the batch is split over "
            f"and the {jax.process_count()} processes; change knn.batch_size."
        )
    if config.total_steps < 1:
        raise ValueError(f"total_steps={config.total_steps} must be positive.")
    optim.learning_rate_schedule(config.optimizer, batch, config.total_steps)  # checks warmup_steps
    return Setup(model, method, mesh, rules, batch, batch // jax.process_count())


def abstract_state(setup: Setup, config: ml_collections.ConfigDict, rng: jax.Array):
    """``(init_fn, abstract boxed state, state shardings)``: the state's shapes without allocating it."""
    tx = optim.build_optimizer(config.optimizer, setup.global_batch, config.total_steps)
    image_shape = (setup.local_batch, config.model.image_size, config.model.image_size, config.model.channels)

    init_fn = functools.partial(train_step.init_state, setup.model, setup.method, tx, image_shape=image_shape)

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        boxed = jax.eval_shape(init_fn, rng)
    shardings = sharding.tree_shardings(boxed, setup.mesh, setup.rules)
    return init_fn, boxed, shardings


def create_state(setup: Setup, init_fn, shardings, rng: jax.Array):
    """The train state, created directly in its sharded layout (never whole on one device)."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)


def compile_train_step(setup: Setup, state_shardings):
    step = functools.partial(train_step.train_step, model=setup.model, method=setup.method)
    return loop.jit_step(step, setup.mesh, setup.rules, state_shardings)


class KnnEvaluator:
    """kNN top-1 accuracy of the encoder's features: memory bank from one split, queries from another."""

    def __init__(self, setup: Setup, config: ml_collections.ConfigDict):
        self.setup, self.config = setup, config
        self.encoder = mae_lib.encoder_of(setup.model)
        self.batch_sharding = sharding.batch_sharding(setup.mesh, setup.rules)
        self._features = jax.jit(lambda params, images: knn.encoder_features(self.encoder, params, images))

    def _batches(self, split: str, limit: int):
        cfg = self.config
        batch = cfg.knn.batch_size
        dataset = pipeline.eval_dataset(
            eval_data_config(cfg.data),
            split,
            batch_size=batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return itertools.islice(iter(dataset), math.ceil(limit / batch))

    def run(self, params) -> float:
        cfg, setup = self.config.knn, self.setup

        def features(local_images):
            images = sharding.global_batch(local_images, self.batch_sharding)
            with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
                return self._features(params["encoder"], images)

        train = knn.collect_features(features, self._batches(self.config.data.split, cfg.train_examples))
        test = knn.collect_features(features, self._batches(self.config.data.eval_split, cfg.test_examples))
        return knn.knn_accuracy(*train, *test, k=cfg.k, temperature=cfg.temperature)


def eval_data_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``data`` for short evaluation passes: in-process, so no worker processes outlive them."""
    return ml_collections.ConfigDict(data.to_dict() | {"num_workers": 0})


def reconstruction_picture(setup: Setup, config, params, images: np.ndarray) -> np.ndarray:
    """A PNG-ready ``uint8`` grid (original / visible / reconstruction) for a few fixed images."""
    params = multihost_utils.process_allgather(params, tiled=True)  # whole on every host, whatever the sharding
    rows, marks = reconstruction.reconstruct(
        setup.model, setup.method, params, images, config.data.mean, config.data.std
    )
    return reconstruction.tile(
        rows, scale=max(1, 112 // config.model.image_size), marks=[None, None, marks], patch_size=setup.model.patch_size
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains per ``config`` in ``workdir``, resuming from its latest checkpoint; returns final metrics."""
    setup = validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rng = jax.random.key(config.seed)
    init_fn, boxed_state, state_shardings = abstract_state(setup, config, rng)
    step_fn, batch_sharding = compile_train_step(setup, state_shardings)

    dataset = pipeline.pretrain_dataset(
        config.data,
        setup.method.layout,
        setup.method.sampler,
        global_batch=setup.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.seed,
    )
    iterator = iter(dataset)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    state, start = loop.restore_or_create(
        checkpointer, boxed_state, state_shardings, iterator, lambda: create_state(setup, init_fn, state_shardings, rng)
    )

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    save_run_config(config, workdir)
    if start:
        writer.log(f"resumed from step {start} in {workdir}")
    evaluator = KnnEvaluator(setup, config)
    picture_images = None  # read on the first picture: runs without pictures never open the eval split for it

    def periodic(step, state):
        nonlocal picture_images
        if config.picture_every and (step % config.picture_every == 0 or step == config.total_steps):
            if picture_images is None:
                picture_images = next(iter(pipeline.eval_dataset(eval_data_config(config.data), batch_size=8)))[
                    "images"
                ]
            picture = reconstruction_picture(setup, config, state.params, picture_images)
            writer.image(step, "reconstruction", picture, os.path.join(workdir, "reconstruction.png"))
        if config.knn.every and step % config.knn.every == 0 and step != config.total_steps:
            writer.scalars(step, {"knn_accuracy": evaluator.run(state.params)})

    try:
        result = loop.run(
            config,
            workdir,
            state=state,
            start=start,
            rng=rng,
            step_fn=step_fn,
            iterator=iterator,
            batch_sharding=batch_sharding,
            checkpointer=checkpointer,
            writer=writer,
            global_batch=setup.global_batch,
            schedule=optim.learning_rate_schedule(config.optimizer, setup.global_batch, config.total_steps),
            periodic=periodic,
        )
        if result.stopped:
            return {"step": result.step, "stopped": True, "preempted": result.preempted, **result.metrics}
        accuracy = evaluator.run(result.state.params)
        writer.scalars(result.step, {"knn_accuracy": accuracy})
        writer.log(f"final kNN top-1 accuracy ({config.data.eval_split}, k={config.knn.k}): {accuracy:.4f}")
        return {"step": result.step, "knn_accuracy": accuracy, **result.metrics}
    finally:
        checkpointer.close()
        writer.close()


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``WORKDIR/config.json``: the run's own description, for tools that read its checkpoints."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as file:
            file.write(config.to_json_best_effort(indent=1))


def load_run(workdir: str | pathlib.Path, step: int | None = None):
    """``(config, model, method, params, step)`` of a run's latest checkpoint (or of ``step``), on this host's
    first local device (each process of a multi-host job reads it whole)."""
    config = checkpoint.read_run_config(workdir, "pretraining")
    model, method = methods.build(config.model, config.method)
    image_shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    tx = optim.build_optimizer(config.optimizer, config.batch_size, config.total_steps)
    step, state = checkpoint.restore_on_local_device(
        workdir, lambda: train_step.init_state(model, method, tx, jax.random.key(0), image_shape), step
    )
    return config, model, method, state.params, step
