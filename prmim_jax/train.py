"""The one trainer: mesh, sharded state (created or restored), the loop, and the evaluators, for every method.

``train_and_evaluate(config, workdir)`` is the whole job, pretraining or
fine-tuning alike (``config.method.name`` picks the method, ``prmim_jax.methods``);
``main.py`` only parses flags and calls it. Everything a bad config can get
wrong is checked by ``validate`` before anything is created or compiled.
Nothing below this module imports it: methods and evaluators get what they need
from it as arguments (a ``sharding.Placement``, ``runs.load``, predict functions).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import ml_collections

from prmim_jax import (
    checkpoint,
    compilation_cache,
    config_validation,
    loop,
    methods,
    optim,
    preemption,
    runs,
    sharding,
    throughput,
    train_step,
)
from prmim_jax.data import pipeline
from prmim_jax.evaluate import build_evaluators
from prmim_jax.metrics import MetricWriter

NonFiniteLossError = loop.NonFiniteLossError  # raised by the loop; importable from here too


@dataclasses.dataclass(frozen=True)
class Setup:
    """What ``validate`` builds from a sound config: the method, where its arrays live, the batch split (the
    global batch of one update, this process's share, the microbatches it is computed in) and the
    evaluators (``config.evals``)."""

    method: methods.Method
    placement: sharding.Placement
    global_batch: int
    local_batch: int
    evaluators: dict = dataclasses.field(default_factory=dict)
    accum_steps: int = 1


def validate(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Checks every key of ``config`` (``config_validation``), then builds method, mesh and evaluators from it;
    raises a one-line ``ValueError`` naming the key and the fix on any impossibility, before anything is
    created, written or compiled. ``devices``: the mesh's (default ``jax.devices()``)."""
    config_validation.check_config(config)
    method = methods.build(config)
    placement = sharding.Placement.from_config(config.sharding, devices)
    batch = config.batch_size
    ways = placement.batch_divisor
    if batch % jax.process_count():
        raise ValueError(
            f"batch_size={batch} must be divisible by the {jax.process_count()} processes; change batch_size."
        )
    if batch % ways:
        raise ValueError(
            f"batch_size={batch} must be divisible by the {ways} devices the batch is split over "
            f"(mesh {dict(placement.mesh.shape)}); change batch_size or sharding.mesh."
        )
    accum = config.grad_accum_steps
    if batch % (accum * ways):
        raise ValueError(
            f"batch_size={batch} must split into grad_accum_steps={accum} microbatches, each divisible by the "
            f"{ways} devices the batch is split over (mesh {dict(placement.mesh.shape)}); change batch_size or "
            "grad_accum_steps."
        )
    if config.data.image_size != config.model.image_size or config.data.channels != config.model.channels:
        raise ValueError(
            f"data gives {config.data.image_size}px x {config.data.channels} channels but the model expects "
            f"{config.model.image_size}px x {config.model.channels}; make data.image_size/channels match model."
        )
    evaluators = build_evaluators(config, method.predict_fns(), placement, method.name)
    return Setup(method, placement, batch, batch // jax.process_count(), evaluators, accum)


def abstract_state(setup: Setup, config: ml_collections.ConfigDict, rng: jax.Array):
    """``(init_fn, abstract boxed state, state shardings)``: the state's shapes without allocating it."""
    tx = setup.method.optimizer(setup.global_batch, config.total_steps)
    init_fn = functools.partial(runs.init_state, setup.method, tx, batch_size=setup.local_batch)
    with setup.placement.active():
        boxed = jax.eval_shape(init_fn, rng)
    return init_fn, boxed, sharding.tree_shardings(boxed, setup.placement.mesh, setup.placement.rules)


def create_state(setup: Setup, init_fn, shardings, rng: jax.Array):
    """A fresh train state, created directly in its sharded layout (never whole on one device), with the
    method's pretrained and frozen parameters (``Method.load_pretrained``, ``Method.load_frozen``) in place."""
    with setup.placement.active():
        state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state.replace(
        params=setup.method.load_pretrained(state.params, shardings.params, runs.load),
        frozen=setup.method.load_frozen(state.frozen, shardings.frozen, runs.load),
    )


def compile_train_step(setup: Setup, state_shardings):
    """``(step_fn, batch_sharding)``: the method's pure step (over ``setup.accum_steps`` microbatches) jitted
    with the state's and batch's shardings."""
    step = functools.partial(train_step.train_step, method=setup.method, accum_steps=setup.accum_steps)
    return loop.jit_step(step, setup.placement, state_shardings)


def count_step_flops(setup: Setup, state, batch, rng) -> float | None:
    """XLA's FLOP count of one update on these arguments' shapes (``prmim_jax.throughput``): the step on the whole
    batch at once, since XLA counts a loop's body once and the microbatches' loop does the same arithmetic; as
    lowered for the run's backend, else (a GPU's step with cuDNN's attention gives no count) for the host's CPU,
    with the method rebuilt with XLA's attention (cuDNN's has no CPU lowering). None where neither counts."""
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch, rng))

    def count(method) -> float | None:
        step = functools.partial(train_step.train_step, method=method)
        return throughput.flops(jax.jit(step).lower(*shapes).cost_analysis())

    counted = count(setup.method)
    if counted is None:
        config = ml_collections.ConfigDict(setup.method.config.to_dict())
        if "attention_impl" in config.model:
            config.model.attention_impl = "xla"
        with jax.default_device(jax.devices("cpu")[0]):
            counted = count(methods.build(config))
    return counted


class Evaluations:
    """The run's evaluators (``Setup.evaluators``) as the trainer runs them: periodically during training, all at
    the end; their scalars go to the writer, their pictures to TensorBoard and ``WORKDIR/<key>.png``."""

    def __init__(self, evaluators: dict, writer: MetricWriter, workdir: str, total_steps: int):
        self.evaluators, self.writer, self.workdir, self.total_steps = evaluators, writer, workdir, total_steps

    def run(self, step: int, variables, names) -> dict:
        results = {}
        for name in names:
            values = self.evaluators[name].run(variables)
            scalars = {k: v for k, v in values.items() if not hasattr(v, "shape")}
            for key, image in values.items():
                if key not in scalars:
                    self.writer.image(step, key, image, os.path.join(self.workdir, f"{key}.png"))
            if scalars:
                self.writer.scalars(step, scalars)
            results[name] = values
        return results

    def periodic(self, step: int, state) -> None:
        """The evaluators due after ``step`` (not the last step's: ``final`` runs every one then)."""
        due = [n for n, e in self.evaluators.items() if e.every and step % e.every == 0 and step != self.total_steps]
        self.run(step, state.variables, due)

    def final(self, step: int, variables) -> dict:
        """Every evaluator's scalars after the last step; each one's summary line goes to the log."""
        metrics = {}
        for name, values in self.run(step, variables, list(self.evaluators)).items():
            self.writer.log(self.evaluators[name].summary(values))
            metrics |= {k: v for k, v in values.items() if not hasattr(v, "shape")}
        return metrics


def prepare(setup: Setup, config: ml_collections.ConfigDict, checkpointer, writer: MetricWriter, watch):
    """The run set up and restored: ``(loop.Loop, state, start step, step rng)``. Creates the data iterator,
    compiles the step, and restores the newest good checkpoint of ``checkpointer`` or creates a fresh state."""
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
    host_state = setup.method.host_state(setup.placement, setup.global_batch)  # AMT's maps, or None
    state, start = loop.restore_or_create(
        checkpointer,
        boxed_state,
        state_shardings,
        iterator,
        lambda: create_state(setup, init_fn, state_shardings, init_rng),
        host_state,
    )
    parts = loop.Loop(
        step_fn=step_fn,
        iterator=iterator,
        batch_sharding=batch_sharding,
        checkpointer=checkpointer,
        writer=writer,
        global_batch=setup.global_batch,
        schedule=optim.learning_rate_schedule(config.optimizer, setup.global_batch, config.total_steps),
        preemption_watch=watch,
        host_state=host_state,
        device_count=setup.placement.mesh.size,
        peak_flops=throughput.peak_flops(
            setup.placement.mesh.devices.flat[0].device_kind, config.model.get("dtype", "float32")
        ),
        count_flops=functools.partial(count_step_flops, setup),
    )
    return parts, state, start, step_rng


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
    compilation_cache.enable(config.compilation_cache)  # before the run compiles anything
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer, failed = None, False
    with preemption.PreemptionWatch() as watch:
        try:
            with watch.interruptible("set-up"):  # no work to lose yet: a SIGTERM stops it at once
                checkpointer = checkpoint.Checkpointer(
                    os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
                )
                parts, state, start, step_rng = prepare(setup, config, checkpointer, writer, watch)
            runs.save_config(config, workdir)
            if start:
                writer.log(f"resumed from step {start} in {workdir}")
            evaluations = Evaluations(setup.evaluators, writer, workdir, config.total_steps)
            parts = dataclasses.replace(parts, periodic=evaluations.periodic)
            result = loop.run(config, workdir, parts, state=state, start=start, rng=step_rng)
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
                final = evaluations.final(result.step, result.state.variables)
            return {"step": result.step, **result.metrics, **final}
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
