"""The pure pretraining step: ``(state, batch, rng) -> (state, metrics)``.

A batch is a dict of ``images [B, H, W, C] float`` and the token ids of
``prmim_jax.masking``: ``ids_visible [B, N_vis]``, ``ids_decoded [B, N_dec]``,
``ids_thrown [B, N_thr]`` (int32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from prmim_jax import masking
from prmim_jax.methods import Method
from prmim_jax.models.mae import MaskedAutoencoder

TrainState = train_state.TrainState


def batch_ids(batch: dict) -> masking.TokenIds:
    return masking.TokenIds(batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"])


def make_batch(images, ids: masking.TokenIds) -> dict:
    return {"images": images, "ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: MaskedAutoencoder, method: Method):
    """One optimizer step on the method's objective.

    Returns the new state and float32 scalar metrics ``loss`` and ``grad_norm``
    (global L2 norm of the gradient before clipping). ``rng`` is folded with
    the step so a resumed run draws what an uninterrupted one would; the
    pretraining model is deterministic, so it is not consumed yet.
    """
    del rng  # folded in by callers that need it: jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(method.loss, argnums=1)(model, state.params, batch["images"], batch_ids(batch))
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, batch: dict, *, model: MaskedAutoencoder, method: Method) -> dict:
    """The objective without an update: ``{'loss': float32 scalar}``."""
    return {"loss": method.loss(model, params, batch["images"], batch_ids(batch))}


def init_params(model: MaskedAutoencoder, method: Method, rng: jax.Array, image_shape: tuple[int, ...]):
    """Boxed (logically partitioned) parameters for ``model`` with ``image_shape = (B, H, W, C)``."""
    layout = method.layout
    ids = masking.TokenIds(
        jnp.zeros((image_shape[0], layout.num_visible), jnp.int32),
        jnp.zeros((image_shape[0], layout.num_decoded), jnp.int32),
        jnp.zeros((image_shape[0], layout.num_thrown), jnp.int32),
    )
    return model.init(rng, jnp.zeros(image_shape, jnp.float32), *ids)["params"]


def init_state(
    model: MaskedAutoencoder, method: Method, tx, rng: jax.Array, image_shape: tuple[int, ...]
) -> TrainState:
    """A fresh train state (boxed parameters, ``tx``'s optimizer state) for ``image_shape = (B, H, W, C)``."""
    return TrainState.create(apply_fn=None, params=init_params(model, method, rng, image_shape), tx=tx)


def jit_train_step(model: MaskedAutoencoder, method: Method, **jit_kwargs):
    return jax.jit(functools.partial(train_step, model=model, method=method), **jit_kwargs)
