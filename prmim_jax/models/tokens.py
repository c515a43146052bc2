"""Device-side token gathers, indexed by the ids of ``prmim_jax.masking``."""

import jax
import jax.numpy as jnp


def take(x: jax.Array, ids: jax.Array) -> jax.Array:
    """``x [B, N, ...]``, ``ids [B, M] int`` -> ``[B, M, ...]`` with ``out[b, m] = x[b, ids[b, m]]``."""
    ids = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, ids, axis=1, mode="promise_in_bounds")
