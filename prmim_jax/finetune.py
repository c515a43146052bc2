"""Fine-tuning, partial fine-tuning and linear probing of a pretrained encoder: the classifier trainer.

``train_and_evaluate(config, workdir)`` is the whole job (``main.py`` runs it
for configs with ``task="finetune"``). It shares pretraining's mesh, sharded
state, checkpoints of state + data iterator, resume, preemption handling and
loop (``prmim_jax.loop``). The pretrained encoder comes from ``config.init``:

- ``init.workdir``: a prmim_jax pretraining workdir (its latest checkpoint and
  ``config.json``), or
- ``init.mae_checkpoint``: an official MAE checkpoint (``.pth``/``.safetensors``),
- neither: training from scratch (the baseline a pretraining must beat).

The position table becomes a parameter, initialised from the pretraining grid's
sin-cos table resized to the fine-tuning grid (``vit.interpolate_pos_embedding``).
Only a fresh run loads the encoder; a resumed run continues from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from prmim_jax import checkpoint, finetune_step, loop, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.metrics import MetricWriter
from prmim_jax.models import classifier, vit
from prmim_jax.models import mae as mae_lib
from prmim_jax.tools import mae_checkpoint


def default_config() -> ml_collections.ConfigDict:
    """Every key the fine-tuning trainer reads, with MAE's fine-tuning defaults (ViT-B, Table 14)."""
    return ml_collections.ConfigDict(
        dict(
            task="finetune",
            seed=0,
            batch_size=1024,
            total_steps=1000,
            # Typed None, so that --config.init.workdir=... works on the command line.
            init=ml_collections.ConfigDict(
                dict(workdir=config_dict.placeholder(str), mae_checkpoint=config_dict.placeholder(str))
            ),
            model=classifier.classifier_config("B/16"),
            optimizer=optim.classifier_optimizer_config(),
            mixing=finetune_step.mixing_config(),
            data=pipeline.data_config(
                source="tfds",
                name="imagenet2012",
                crop_scale=(0.08, 1.0),
                rand_augment="rand-m9-mstd0.5-inc1",
                random_erase_prob=0.25,
            ),
            sharding=sharding.sharding_config(),
            eval=ml_collections.ConfigDict(dict(every=0, batch_size=256)),
            log_every=50,
            stop_after=0,
            checkpoint_every=1000,
            keep_checkpoints=3,
        )
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    model: classifier.Classifier
    mixing: finetune_step.Mixing
    mesh: jax.sharding.Mesh
    rules: tuple
    global_batch: int
    local_batch: int
    depth: int


def validate(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Builds the classifier and mesh; raises ``ValueError`` with the fix on any impossibility, before compiling."""
    model = classifier.build_classifier(config.model)
    mesh = sharding.make_mesh(config.sharding, devices)
    rules = sharding.rules(config.sharding)
    ways = sharding.batch_divisor(mesh, rules)
    for name, batch in (("batch_size", config.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if batch % ways or batch % jax.process_count():
            raise ValueError(
                f"{name}={batch} must be divisible by the {ways} devices the batch is split over "
                f"(mesh {dict(mesh.shape)}) and the {jax.process_count()} processes; change {name}."
            )
    if config.data.image_size != config.model.image_size or config.data.channels != config.model.channels:
        raise ValueError(
            f"data gives {config.data.image_size}px x {config.data.channels} channels but the model expects "
            f"{config.model.image_size}px x {config.model.channels}; make data.image_size/channels match model."
        )
    if config.total_steps < 1:
        raise ValueError(f"total_steps={config.total_steps} must be positive.")
    if config.init.workdir and config.init.mae_checkpoint:
        raise ValueError(
            "set one of init.workdir (our pretraining run) and init.mae_checkpoint (official MAE), not both."
        )
    mix = config.mixing
    if mix.mixup_alpha < 0 or mix.cutmix_alpha < 0 or not 0 <= mix.prob <= 1 or not 0 <= mix.switch_prob <= 1:
        raise ValueError(f"mixing={mix.to_dict()}: alphas must be >= 0 and probabilities in [0, 1].")
    if not 0 <= mix.label_smoothing < 1:
        raise ValueError(f"mixing.label_smoothing={mix.label_smoothing} must lie in [0, 1).")
    if config.init.workdir:
        _check_pretrained_encoder(config.init.workdir, model.encoder)
    # Checks optimizer.name and warmup_steps.
    optim.build_classifier_optimizer(
        config.optimizer,
        config.batch_size,
        config.total_steps,
        depth=model.encoder.depth,
        trainable_blocks=config.model.trainable_blocks,
    )
    mixing = finetune_step.Mixing.from_config(config.mixing, config.model.num_classes)
    batch = config.batch_size
    return Setup(model, mixing, mesh, rules, batch, batch // jax.process_count(), model.encoder.depth)


def _check_pretrained_encoder(workdir: str, encoder: vit.Encoder) -> None:
    try:
        pretraining = checkpoint.read_run_config(workdir, "pretraining")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"init.workdir={workdir}: {error} Then point it at a prmim_jax pretraining workdir."
        ) from None
    pretrained = mae_lib.build_mae(pretraining.model)
    ours = (encoder.width, encoder.depth, encoder.num_heads, encoder.mlp_dim, encoder.patch_size)
    theirs = (pretrained.width, pretrained.depth, pretrained.num_heads, pretrained.mlp_dim, pretrained.patch_size)
    if ours != theirs:
        raise ValueError(
            f"init.workdir={workdir} pretrained an encoder of (width, depth, heads, mlp, patch) {theirs}, "
            f"but model asks for {ours}; make model's variant and sizes match the pretraining run's."
        )


def pretrained_encoder(config: ml_collections.ConfigDict, encoder: vit.Encoder) -> dict | None:
    """The pretrained encoder's parameters for ``encoder`` (numpy, host memory), or ``None`` without ``init``.

    ``pos_embedding`` is the pretraining grid's sin-cos table resized to ``encoder.grid``.
    """
    if config.init.workdir:
        pretraining, _, _, params, _ = train.load_run(config.init.workdir)
        pretrained = mae_lib.build_mae(pretraining.model)
        params = params["encoder"]
    elif config.init.mae_checkpoint:
        pretrained = mae_lib.MaskedAutoencoder(
            patch_size=encoder.patch_size,
            image_size=encoder.image_size,
            channels=config.model.channels,
            width=encoder.width,
            depth=encoder.depth,
            num_heads=encoder.num_heads,
            mlp_dim=encoder.mlp_dim,
            decoder_width=16,
            decoder_depth=1,
            decoder_num_heads=1,
            decoder_mlp_dim=16,
        )
        params = mae_checkpoint.load(config.init.mae_checkpoint, pretrained)["encoder"]
    else:
        return None
    table = vit.sincos_2d(pretrained.width, pretrained.grid)
    params = jax.tree.map(np.asarray, params) | {
        "pos_embedding": np.asarray(vit.interpolate_pos_embedding(table, pretrained.grid, encoder.grid))
    }
    return params


def abstract_state(setup: Setup, config: ml_collections.ConfigDict, rng: jax.Array):
    """``(init_fn, abstract boxed state, state shardings)``."""
    tx = optim.build_classifier_optimizer(
        config.optimizer,
        setup.global_batch,
        config.total_steps,
        depth=setup.depth,
        trainable_blocks=config.model.trainable_blocks,
    )
    image_shape = (setup.local_batch, config.model.image_size, config.model.image_size, config.model.channels)
    init_fn = functools.partial(finetune_step.init_state, setup.model, tx, image_shape=image_shape)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        boxed = jax.eval_shape(init_fn, rng)
    return init_fn, boxed, sharding.tree_shardings(boxed, setup.mesh, setup.rules)


def create_state(setup: Setup, config, init_fn, shardings, rng: jax.Array):
    """A fresh state on the mesh with the pretrained encoder (if any) in place of the random one."""
    state = train.create_state(setup, init_fn, shardings, rng)
    encoder = pretrained_encoder(config, setup.model.encoder)
    if encoder is None:
        return state
    fresh = state.params["encoder"]
    missing = set(fresh) - set(encoder)
    if missing:
        raise ValueError(f"the pretrained encoder lacks {sorted(missing)}; was it trained with another architecture?")

    def loaded(path, old, sharding_):
        new = encoder
        for key in path:
            new = new[key.key]
        if new.shape != old.shape:
            name = "/".join(k.key for k in path)
            raise ValueError(f"pretrained encoder's {name} is {new.shape}; the classifier needs {old.shape}.")
        return jax.device_put(new.astype(old.dtype), sharding_)

    params = dict(state.params)
    params["encoder"] = jax.tree_util.tree_map_with_path(loaded, fresh, shardings.params["encoder"])
    return state.replace(params=params)


class Evaluator:
    """Top-1 accuracy and mean cross-entropy over a whole split (padding rows excluded)."""

    def __init__(self, setup: Setup, config: ml_collections.ConfigDict):
        self.setup, self.config = setup, config
        self.batch_sharding = sharding.batch_sharding(setup.mesh, setup.rules)
        self._step = jax.jit(functools.partial(finetune_step.eval_step, model=setup.model))

    def run(self, params, batch_stats, split: str | None = None) -> dict:
        dataset = pipeline.eval_dataset(
            train.eval_data_config(self.config.data),
            split,
            batch_size=self.config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        totals = {"correct": 0.0, "count": 0.0, "loss": 0.0}
        with jax.set_mesh(self.setup.mesh), nn.logical_axis_rules(self.setup.rules):
            for batch in dataset:
                sums = self._step(params, batch_stats, sharding.global_batch(batch, self.batch_sharding))
                for key, value in jax.device_get(sums).items():
                    totals[key] += float(value)
        return {"accuracy": totals["correct"] / totals["count"], "eval_loss": totals["loss"] / totals["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes per ``config`` in ``workdir``, resuming from its latest checkpoint; returns final metrics."""
    setup = validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    init_fn, boxed_state, state_shardings = abstract_state(setup, config, init_rng)
    step = functools.partial(finetune_step.train_step, model=setup.model, mixing=setup.mixing)
    step_fn, batch_sharding = loop.jit_step(step, setup.mesh, setup.rules, state_shardings)
    dataset = pipeline.finetune_dataset(
        config.data,
        global_batch=setup.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.seed,
    )
    iterator = iter(dataset)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    state, start = loop.restore_or_create(
        checkpointer,
        boxed_state,
        state_shardings,
        iterator,
        lambda: create_state(setup, config, init_fn, state_shardings, init_rng),
    )
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    train.save_run_config(config, workdir)
    if start:
        writer.log(f"resumed from step {start} in {workdir}")
    evaluator = Evaluator(setup, config)

    def periodic(step, state):
        if config.eval.every and step % config.eval.every == 0 and step != config.total_steps:
            writer.scalars(step, evaluator.run(state.params, state.batch_stats))

    try:
        result = loop.run(
            config,
            workdir,
            state=state,
            start=start,
            rng=step_rng,
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
        evaluation = evaluator.run(result.state.params, result.state.batch_stats)
        writer.scalars(result.step, evaluation)
        writer.log(f"final top-1 accuracy ({config.data.eval_split}): {evaluation['accuracy']:.4f}")
        return {"step": result.step, **result.metrics, **evaluation}
    finally:
        checkpointer.close()
        writer.close()


def load_classifier(workdir: str | os.PathLike):
    """``(predict_fn, data_config)`` of a fine-tuning run's latest checkpoint, on this host's devices.

    ``predict_fn(images [b, H, W, C] float32, normalised per ``data_config``) ->
    logits [b, num_classes] numpy float32``, jitted; ``data_config`` is the
    run's data section (image size, normalisation, evaluation crop).
    """
    config = checkpoint.read_run_config(workdir, "fine-tuning")
    model = classifier.build_classifier(config.model)
    tx = optim.build_classifier_optimizer(
        config.optimizer,
        config.batch_size,
        config.total_steps,
        depth=model.encoder.depth,
        trainable_blocks=config.model.trainable_blocks,
    )
    image_shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    _, state = checkpoint.restore_on_local_device(
        workdir, lambda: finetune_step.init_state(model, tx, jax.random.key(0), image_shape)
    )
    apply = jax.jit(functools.partial(finetune_step.logits, model=model))

    def predict_fn(images):
        return np.asarray(apply(state.params, state.batch_stats, images))

    return predict_fn, config.data
