"""The training loop that pretraining and fine-tuning share: steps, progress lines, checkpoints, stops.

``run(...)`` owns what every trainer needs around its pure step: the progress
line and scalars every ``log_every`` steps, a checkpoint of the state and the
data iterator every ``checkpoint_every`` steps and at the end, the refusal to
save non-finite parameters, and a clean stop (checkpoint saved) on SIGTERM
(the trainer's ``preemption.PreemptionWatch``) or after ``stop_after`` steps.
The trainer's own periodic work (pictures, evaluations) comes in as
``Loop.periodic(step, state)``; a method's per-image host state (``methods.HostState``:
AMT's attention maps) as ``Loop.host_state``, which draws each batch's token sets, is
refreshed after each step before that step's checkpoint, and is saved with it.

Before the first step the loop compiles the step for the first batch (``compile_ahead``), so
the first progress line times steps, not XLA, and it has XLA's FLOP count of the step: each
progress line gives the TFLOP/s per device and, on a device of known peak, the MFU
(``prmim_jax.throughput``). ``config.profile`` traces a window of steps (``prmim_jax.profiling``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from prmim_jax import checkpoint, preemption, profiling, sharding, throughput
from prmim_jax.metrics import MetricWriter


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


NON_FINITE_FIX = (
    "The last checkpoint stays the last good one. Lower optimizer.base_lr, raise optimizer.warmup_steps "
    "or set optimizer.grad_clip_norm, then rerun to resume from it."
)


@dataclasses.dataclass
class LoopResult:
    state: object
    step: int
    metrics: dict  # the last logged scalars
    stopped: bool  # saved and stopped early (preemption or stop_after); rerun to resume
    preempted: bool


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@jax.jit
def params_norm(params) -> jax.Array:
    return optax.tree.norm(params)


def check_finite(metrics: dict, step: int) -> dict:
    """``metrics`` as Python floats; raises ``NonFiniteLossError`` if any is NaN or infinite."""
    values = {k: float(v) for k, v in metrics.items()}
    if not all(np.isfinite(v) for v in values.values()):
        raise NonFiniteLossError(
            f"loss {values.get('loss')}, grad_norm {values.get('grad_norm')} at step {step}; stopping without saving. "
            + NON_FINITE_FIX
        )
    return values


@dataclasses.dataclass(frozen=True)
class JittedStep:
    """``step(state, batch, rng)`` under ``jax.jit`` (``jitted``), called and lowered under the placement's mesh
    and logical-axis rules."""

    jitted: Callable
    placement: sharding.Placement

    def __call__(self, state, batch, rng):
        with self.placement.active():
            return self.jitted(state, batch, rng)

    def lower(self, state, batch, rng) -> jax.stages.Lowered:
        """The step traced for these arguments (arrays or ``jax.ShapeDtypeStruct``s), not compiled."""
        with self.placement.active():
            return self.jitted.lower(state, batch, rng)


def jit_step(step: Callable, placement: sharding.Placement, state_shardings):
    """``(run, batch_sharding)``: ``step(state, batch, rng)`` compiled with the state's and batch's shardings,
    the state donated, run under the placement's mesh and logical-axis rules (``run`` is a ``JittedStep``)."""
    batch_sharding = placement.batch_sharding
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return JittedStep(jitted, placement), batch_sharding


def restore_or_create(
    checkpointer: checkpoint.Checkpointer,
    boxed_state,
    state_shardings,
    iterator,
    create: Callable,
    host_state=None,
):
    """``(state, start_step)``: the newest good checkpoint's state (and ``iterator`` moved to its position,
    ``host_state`` loaded), else ``create()`` at step 0. ``boxed_state`` is the ``jax.eval_shape`` of the
    state's init.

    Damaged newer steps are moved aside with a warning (see ``checkpoint``); a run whose every checkpoint
    is damaged raises ``checkpoint.CheckpointDamagedError`` rather than start again over them."""
    abstract = jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.unbox(boxed_state),
        state_shardings,
    )
    restored = checkpointer.restore_latest(abstract, host=host_state is not None)
    if restored is None:
        return create(), 0
    start, state, data_state, *host_arrays = restored
    iterator.set_state(data_state)
    if host_state is not None:
        host_state.load_state_dict(host_arrays[0])
    return state, start


@dataclasses.dataclass(frozen=True)
class Loop:
    """What the loop runs with, set up by the trainer.

    ``step_fn(state, batch, rng) -> (state, metrics)`` (``jit_step``) with ``batch_sharding`` for its batches,
    read from ``iterator``; ``checkpointer`` and ``writer``; ``global_batch`` (images per step) and the
    learning-rate ``schedule`` for the progress line; ``preemption_watch`` (entered by the caller, which
    guards the whole run with it) says when a SIGTERM asks to save and stop; ``periodic(step, state)``: the
    trainer's periodic work (evaluations), or None; ``host_state`` (``methods.HostState``, or None) turns
    each host batch into the training batch, is refreshed after each step and saved with each checkpoint.
    Throughput: ``device_count`` (the mesh's devices), ``peak_flops`` (one device's, None where unknown) and
    ``count_flops(state, batch, rng)``, the global step's FLOPs (None: no count; ``compile_ahead``).
    """

    step_fn: Callable
    iterator: object
    batch_sharding: object
    checkpointer: checkpoint.Checkpointer
    writer: MetricWriter
    global_batch: int
    schedule: optax.Schedule
    preemption_watch: preemption.PreemptionWatch
    periodic: Callable | None = None
    host_state: object = None
    device_count: int = 1
    peak_flops: float | None = None
    count_flops: Callable | None = None


def compile_ahead(parts: Loop, state, batch, rng) -> float | None:
    """Compiles ``parts.step_fn`` for these arguments before it first runs (the step's call then finds it
    compiled); returns the global step's FLOPs, ``parts.count_flops``' (None without it)."""
    parts.step_fn.lower(state, batch, rng).compile()
    return None if parts.count_flops is None else parts.count_flops(state, batch, rng)


def progress_line(step: int, total_steps: int, values: dict, rates: dict, eta: float) -> str:
    """The console line of a logged step: loss, gradient norm, images/s, TFLOP/s per device and MFU (where
    ``rates`` has them: ``throughput.utilisation``), ETA."""
    line = f"step {step}/{total_steps} | loss {values['loss']:.4f} | grad_norm {values['grad_norm']:.3f} | "
    line += f"{rates['images_per_second']:,.0f} img/s"
    if "tflops_per_device" in rates:
        line += f" | {rates['tflops_per_device']:.3g} TFLOP/s/device"
    if "mfu" in rates:
        line += f" | MFU {rates['mfu']:.1%}"
    return line + f" | ETA {format_duration(eta)}"


def run(
    config: ml_collections.ConfigDict, workdir: str, parts: Loop, *, state, start: int, rng: jax.Array
) -> LoopResult:
    """Runs ``state, metrics = step_fn(state, batch, fold_in(rng, step))`` from ``start`` to ``config.total_steps``
    with ``parts`` (``Loop``).

    ``metrics`` holds scalars including ``loss`` and ``grad_norm``. Reads
    ``config.total_steps``, ``log_every``, ``checkpoint_every``, ``stop_after`` and ``profile`` (a trace into
    ``workdir/profile`` by process 0).
    The final checkpoint (``total_steps``) is only started here: the caller waits
    for it (``checkpointer.wait()``), and a SIGTERM meanwhile cannot cut it short. The host state's refresh
    time is left out of the images-per-second figure.
    """
    step_fn, iterator, checkpointer, writer = parts.step_fn, parts.iterator, parts.checkpointer, parts.writer
    host_state, global_batch = parts.host_state, parts.global_batch
    metrics_history, last_metrics, step_flops = {}, None, None
    window_start, window_steps = time.perf_counter(), 0
    step = start
    profile = profiling.Window(config.profile, os.path.join(workdir, "profile"), enabled=jax.process_index() == 0)
    with profile:
        while step < config.total_steps:
            checkpointer.check_save()  # a failed asynchronous save stops the run at once, not at the next save
            batch = next(iterator)
            if host_state is not None:
                batch = host_state.sample(batch)
            batch = sharding.global_batch(batch, parts.batch_sharding)
            step_rng = jax.random.fold_in(rng, step)
            if step == start:
                step_flops = compile_ahead(parts, state, batch, step_rng)
                window_start = time.perf_counter()
            profile.start(step)
            state, last_metrics = step_fn(state, batch, step_rng)
            step += 1
            window_steps += 1
            if message := profile.stop(step, (state, last_metrics)):
                writer.log(message)
            if step % config.log_every == 0 or step == config.total_steps:
                values = check_finite(jax.device_get(last_metrics), step)
                elapsed = time.perf_counter() - window_start
                rates = {"images_per_second": window_steps * global_batch / elapsed}
                rates |= throughput.utilisation(
                    step_flops, parts.device_count, elapsed / window_steps, parts.peak_flops
                )
                eta = (config.total_steps - step) * elapsed / window_steps
                writer.scalars(step, {**values, "learning_rate": float(parts.schedule(step)), **rates})
                writer.log(progress_line(step, config.total_steps, values, rates, eta))
                metrics_history = values
                window_start, window_steps = time.perf_counter(), 0
            if host_state is not None:
                refresh_start = time.perf_counter()
                if message := host_state.refresh(step, state.params):
                    seconds = time.perf_counter() - refresh_start
                    writer.log(message)
                    writer.scalars(step, {"host_state_refresh_seconds": seconds})
                    window_start += seconds  # the next progress line counts training only
            preempted = parts.preemption_watch.should_stop(step)
            stop = step < config.total_steps and (
                preempted or (config.stop_after and step - start >= config.stop_after)
            )
            if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
                check_finite(jax.device_get(last_metrics), step)
                if not np.isfinite(float(params_norm(state.params))):
                    raise NonFiniteLossError(
                        f"parameters are not finite after step {step}; not saving them. " + NON_FINITE_FIX
                    )
                host_arrays = None if host_state is None else host_state.state_dict()
                checkpointer.save(step, state, iterator.get_state(), force=stop, host_arrays=host_arrays)
            if stop:
                checkpointer.wait()
                reason = "preempted" if preempted else f"stop_after={config.stop_after}"
                writer.log(f"{reason}: saved step {step} in {workdir}; rerun the same command to resume")
                return LoopResult(state, step, metrics_history, stopped=True, preempted=preempted)
            if parts.periodic is not None:
                parts.periodic(step, state)
    return LoopResult(state, step, metrics_history, stopped=False, preempted=False)
