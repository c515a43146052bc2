"""The one pure training step, for every method: ``(state, batch, rng) -> (state, metrics)``.

A batch is the dict of named arrays of the method's ``batch_spec``
(``prmim_jax.methods``); the method's ``loss`` says what they mean. Images may
arrive as uint8 pixels (the pipeline's default): the step normalises them
(``Method.normalize``) before the method sees them.
"""

from __future__ import annotations

import jax
import optax

from prmim_jax.methods import Method, Variables
from prmim_jax.runs import TrainState


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, method: Method):
    """One optimizer step on ``method.loss``.

    Returns the new state and float32 scalar metrics: ``loss``, ``grad_norm``
    (global L2 norm of the gradient before clipping) and the method's own.
    ``rng`` is folded with the step by the caller, so a resumed run draws what
    an uninterrupted one would.
    """

    batch = dict(batch, images=method.normalize(batch["images"]))

    def loss_fn(params):
        loss, metrics, batch_stats = method.loss(Variables(params, state.frozen, state.batch_stats), batch, rng)
        return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
