"""The one trainer: mesh, sharded state (created or restored), the loop, and the evaluators, for every method.

``train_and_evaluate(config, workdir)`` is the whole job, pretraining or
fine-tuning alike (``config.method.name`` picks the method, ``prmim_jax.methods``);
``main.py`` only parses flags and calls it. Everything a bad config can get
wrong is checked by ``validate`` before anything is created or compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import flax.linen as nn
import jax
import ml_collections

from prmim_jax import checkpoint, config_validation, loop, methods, optim, preemption, sharding, train_step
from prmim_jax.data import pipeline
from prmim_jax.evaluate import build_evaluators, eval_config
from prmim_jax.metrics import MetricWriter
from prmim_jax.models import mae as mae_lib


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with MAE's pretraining defaults; experiment configs start here and override.

    ``model``, ``method`` and ``optimizer`` are the method's (``methods.<name>``);
    ``evals`` maps names to evaluator sections (``prmim_jax.evaluate``).
    """
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=4096,
            total_steps=1000,
            model=mae_lib.model_config("B/16"),
            method=methods.method_config("prmim"),
            optimizer=optim.optimizer_config(),
            data=pipeline.data_config(),
            sharding=sharding.sharding_config(),
            evals=ml_collections.ConfigDict(dict(knn=eval_config("knn"))),
            log_every=50,
            stop_after=0,  # > 0: save and stop after this many steps in this invocation (scheduler time limits)
            checkpoint_every=1000,
            keep_checkpoints=3,
        )
    )


NonFiniteLossError = loop.NonFiniteLossError  # raised by the loop; importable from here too


@dataclasses.dataclass(frozen=True)
class Setup:
    method: methods.Method
    mesh: jax.sharding.Mesh
    rules: tuple
    global_batch: int
    local_batch: int
    evaluators: dict = dataclasses.field(default_factory=dict)  # name -> evaluator, from config.evals


def validate(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Checks every key of ``config`` (``config_validation``), then builds method, mesh and evaluators from it;
    raises a one-line ``ValueError`` naming the key and the fix on any impossibility, before anything is
    created, written or compiled. ``devices``: the mesh's (default ``jax.devices()``)."""
    config_validation.check_config(config)
    method = methods.build(config)
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
    setup = Setup(method, mesh, rules, batch, batch // jax.process_count())
    # Building them checks every evaluator's section; the trainer then uses these.
    return dataclasses.replace(setup, evaluators=build_evaluators(method, setup, config))


def abstract_state(setup: Setup, config: ml_collections.ConfigDict, rng: jax.Array):
    """``(init_fn, abstract boxed state, state shardings)``: the state's shapes without allocating it."""
    tx = setup.method.optimizer(setup.global_batch, config.total_steps)
    init_fn = functools.partial(train_step.init_state, setup.method, tx, batch_size=setup.local_batch)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        boxed = jax.eval_shape(init_fn, rng)
    return init_fn, boxed, sharding.tree_shardings(boxed, setup.mesh, setup.rules)


def create_state(setup: Setup, init_fn, shardings, rng: jax.Array):
    """A fresh train state, created directly in its sharded layout (never whole on one device), with the
    method's pretrained and frozen parameters (``Method.load_pretrained``, ``Method.load_frozen``) in place."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state.replace(
        params=setup.method.load_pretrained(state.params, shardings.params),
        frozen=setup.method.load_frozen(state.frozen, shardings.frozen),
    )


def compile_train_step(setup: Setup, state_shardings):
    """``(step_fn, batch_sharding)``: the method's pure step jitted with the state's and batch's shardings."""
    step = functools.partial(train_step.train_step, method=setup.method)
    return loop.jit_step(step, setup.mesh, setup.rules, state_shardings)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its latest checkpoint; returns final metrics.

    One SIGTERM guard (``preemption.PreemptionWatch``) covers the whole run after ``validate``: a
    SIGTERM during set-up or the final evaluation stops at once (nothing is lost), during training
    the loop saves the next step and stops, during the final save that save completes and the final
    evaluation is skipped. Each prints why it stopped and returns ``{'step', 'stopped': True,
    'preempted': True, ...}``; the rerun of the same command resumes (after the final step it only
    evaluates).
    """
    setup = validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer, failed = None, False
    with preemption.PreemptionWatch() as watch:
        try:
            with watch.interruptible("set-up"):  # no work to lose yet: a SIGTERM stops it at once
                init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
                init_fn, boxed_state, state_shardings = abstract_state(setup, config, init_rng)
                step_fn, batch_sharding = compile_train_step(setup, state_shardings)
                dataset = pipeline.train_dataset(
                    config.data,
                    setup.method.host,
                    global_batch=setup.global_batch,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    seed=config.seed,
                )
                iterator = iter(dataset)
                host_state = setup.method.host_state(setup)  # per-image sampler state (AMT's maps), or None
                checkpointer = checkpoint.Checkpointer(
                    os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
                )
                state, start = loop.restore_or_create(
                    checkpointer,
                    boxed_state,
                    state_shardings,
                    iterator,
                    lambda: create_state(setup, init_fn, state_shardings, init_rng),
                    host_state,
                )
            save_run_config(config, workdir)
            if start:
                writer.log(f"resumed from step {start} in {workdir}")
            evaluators = setup.evaluators

            def evaluate(step, state, names):
                results = {}
                for name in names:
                    values = evaluators[name].run(state)
                    scalars = {k: v for k, v in values.items() if not hasattr(v, "shape")}
                    for key, image in values.items():
                        if key not in scalars:
                            writer.image(step, key, image, os.path.join(workdir, f"{key}.png"))
                    if scalars:
                        writer.scalars(step, scalars)
                    results[name] = values
                return results

            def periodic(step, state):
                due = [
                    n for n, e in evaluators.items() if e.every and step % e.every == 0 and step != config.total_steps
                ]
                evaluate(step, state, due)

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
                preemption_watch=watch,
                periodic=periodic,
                host_state=host_state,
            )
            if result.stopped:
                return {"step": result.step, "stopped": True, "preempted": result.preempted, **result.metrics}
            checkpointer.wait()  # the final checkpoint is complete (a SIGTERM meanwhile only set the flag)
            if watch.signalled:
                writer.log(
                    f"preempted after the final step: step {result.step} is saved in {workdir} and training is "
                    "complete; rerun the same command to run the final evaluation"
                )
                return {"step": result.step, "stopped": True, "preempted": True, **result.metrics}
            with watch.interruptible("the final evaluation"):
                final = evaluate(result.step, result.state, list(evaluators))
            metrics = {"step": result.step, **result.metrics}
            for name, values in final.items():
                writer.log(evaluators[name].summary(values))
                metrics |= {k: v for k, v in values.items() if not hasattr(v, "shape")}
            return metrics
        except preemption.Preempted as stop:
            if stop.phase == "set-up":
                writer.log("preempted during set-up, before training: nothing new to save; rerun the same command")
                return {"step": 0, "stopped": True, "preempted": True}
            writer.log(
                f"preempted during {stop.phase}: the final step {config.total_steps} is saved in {workdir}; "
                "rerun the same command to evaluate it"
            )
            return {"step": config.total_steps, "stopped": True, "preempted": True}
        except BaseException:
            failed = True
            raise
        finally:
            # After a failure with several processes, saves in flight are left unfinished: finishing one needs
            # every process, and the failing one may never arrive (a barrier waits minutes). The step
            # directory of an unfinished save never appears, so the newest complete checkpoint stays.
            if checkpointer is not None and not (failed and jax.process_count() > 1):
                checkpointer.close()
            writer.close()


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``WORKDIR/config.json``: the run's own description, for tools that read its checkpoints."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as file:
            file.write(config.to_json_best_effort(indent=1))


def load_run(workdir: str | pathlib.Path, step: int | None = None):
    """``(config, method, params, step)`` of a run's latest checkpoint (or of ``step``), on this host's first
    local device (each process of a multi-host job reads it whole). ``params`` are the trained parameters;
    a run with running statistics or frozen parameters has them in ``method``'s ``Variables`` via
    ``load_variables``."""
    config, method, variables, step = load_variables(workdir, step)
    return config, method, variables.params, step


def load_variables(workdir: str | pathlib.Path, step: int | None = None):
    """``(config, method, Variables, step)`` of a run's latest checkpoint (or of ``step``); see ``load_run``."""
    config = checkpoint.read_run_config(workdir, "prmim_jax")
    method = methods.build(config)
    tx = method.optimizer(config.batch_size, config.total_steps)
    step, state = checkpoint.restore_on_local_device(
        workdir, lambda: train_step.init_state(method, tx, jax.random.key(0), 1), step
    )
    return config, method, state.variables, step
