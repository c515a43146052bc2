"""The one pure training step, for every method: ``(state, batch, rng) -> (state, metrics)``.

A batch is the dict of named arrays of the method's ``batch_spec``
(``prmim_jax.methods``); the method's ``loss`` says what they mean. Images may
arrive as uint8 pixels (the pipeline's default): the step normalises them
(``Method.normalize``) before the method sees them.

Gradient accumulation (``accum_steps = k > 1``, ``config.grad_accum_steps``): the global batch of ``B``
images is cut into ``k`` microbatches of ``B / k`` (``microbatches``) and ``jax.lax.scan`` runs the
forward and backward pass of one at a time, so activations are held for ``B / k`` images only. One
optimizer update follows, with the mean of the microbatch gradients. Every method's loss is a mean over
its images with the same weight for each (token counts are static), so for microbatches of equal size
the mean of their means is the batch's mean: the update is one batch's of ``B`` up to float32
summation order, as long as the loss treats images independently. Where it does not:

- batch statistics (``Variables.batch_stats``: a classifier's BatchNorm head): each microbatch is
  normalised with its own statistics (ghost batch normalisation, as data-parallel PyTorch without
  SyncBatchNorm normalises each GPU's batch), so the gradient differs from one big batch's; the
  running statistics become the mean of what each microbatch alone would give, one momentum step per
  update. Where the normalised features do not depend on the BatchNorm (the head's: encoder features),
  the running mean is exactly the big batch's and the running variance falls short of it by the
  variance of the microbatch means;
- mixup / cutmix (``methods.classify``) pairs images within a microbatch and draws one mixing per
  microbatch; drop path draws per image, from each microbatch's own rng (``fold_in(rng, j)``).

Metrics are the means over the microbatches; ``grad_norm`` is the norm of the mean gradient.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prmim_jax.methods import Method, Variables
from prmim_jax.runs import TrainState


def gradients(state: TrainState, batch: dict, rng: jax.Array, method: Method):
    """``(grads, metrics, batch_stats)`` of ``method.loss`` on ``batch`` at ``state``'s parameters; ``metrics``
    holds ``loss`` and the method's own float32 scalars."""
    batch = dict(batch, images=method.normalize(batch["images"]))

    def loss_fn(params):
        loss, metrics, batch_stats = method.loss(Variables(params, state.frozen, state.batch_stats), batch, rng)
        return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, {"loss": loss, **metrics}, batch_stats


def microbatches(batch: dict, accum_steps: int) -> dict:
    """Each ``[B, ...]`` array of ``batch`` -> ``[accum_steps, B / accum_steps, ...]``, microbatch ``j`` holding
    images ``j, j + k, j + 2k, ...``. Strided, not contiguous: the batch axis is split over the devices in
    contiguous blocks, so every device holds ``B / (k * devices)`` images of every microbatch and the cut
    moves no data; the constraint keeps each microbatch split over the batch's mesh axes."""

    def cut(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map(cut, batch)


def accumulated_gradients(state: TrainState, batch: dict, rng: jax.Array, method: Method, accum_steps: int):
    """``gradients`` averaged over the ``accum_steps`` microbatches of ``batch`` (``microbatches``), computed one
    microbatch at a time; microbatch ``j`` draws from ``fold_in(rng, j)``."""

    def add(total, indexed):
        index, micro = indexed
        return jax.tree_util.tree_map(jnp.add, total, gradients(state, micro, jax.random.fold_in(rng, index), method))

    split = microbatches(batch, accum_steps)
    one = jax.tree_util.tree_map(lambda x: x[0], split)
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: gradients(state, one, rng, method))
    )
    total, _ = jax.lax.scan(lambda t, x: (add(t, x), None), zeros, (jnp.arange(accum_steps), split))
    return jax.tree_util.tree_map(lambda x: x / accum_steps, total)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, method: Method, accum_steps: int = 1):
    """One optimizer step on ``method.loss``, over ``accum_steps`` microbatches of ``batch`` (module docstring).

    Returns the new state and float32 scalar metrics: ``loss``, ``grad_norm``
    (global L2 norm of the gradient before clipping) and the method's own.
    ``rng`` is folded with the step by the caller, so a resumed run draws what
    an uninterrupted one would.
    """
    if accum_steps == 1:
        grads, metrics, batch_stats = gradients(state, batch, rng, method)
    else:
        grads, metrics, batch_stats = accumulated_gradients(state, batch, rng, method, accum_steps)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": metrics["loss"], "grad_norm": optax.tree.norm(grads), **metrics}
