"""BEiT's relative position bias for a ViT with a cls token (SimMIM's ViT): its table, index and bias.

One table row per 2-D offset between two grid tokens, plus three rows for the cls token
(cls -> token, token -> cls, cls -> cls); a pair's bias is its row, per head. SimMIM's
pretraining shares one table by all blocks; its fine-tuning gives each block its own, each
started from the shared one (``SimMIMEncoder.adapt_pretrained``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def relative_position_bias_size(grid: tuple[int, int]) -> int:
    """Rows of BEiT's relative position table: every 2-D offset on ``grid``, then cls->token, token->cls, cls->cls."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


@functools.cache
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """``[1 + N, 1 + N] int32``: the table row of the bias from query ``i`` to key ``j``, cls at 0, tokens row-major.

    BEiT's / SimMIM's ``relative_position_index``: tokens at ``(r_i, c_i)``
    and ``(r_j, c_j)`` use row ``(r_i - r_j + H - 1) * (2 W - 1) + c_i - c_j + W - 1``;
    the cls query uses row ``R - 3`` for every key, every query uses ``R - 2``
    for the cls key, and cls to cls is ``R - 1`` (``R`` rows in all).
    """
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    offsets = (rows[:, None] - rows[None, :] + grid[0] - 1) * (2 * grid[1] - 1) + cols[:, None] - cols[None, :]
    size = relative_position_bias_size(grid)
    index = np.zeros((1 + rows.size, 1 + rows.size), np.int32)
    index[1:, 1:] = offsets + grid[1] - 1
    index[0, :] = size - 3
    index[:, 0] = size - 2
    index[0, 0] = size - 1
    index.flags.writeable = False
    return index


def relative_bias(table: jax.Array, grid: tuple[int, int], ids: jax.Array | None) -> jax.Array:
    """The relative position bias of the sequence ``[cls, ids]``: the table row of every query/key pair.

    ``table [R, heads]`` (``R = relative_position_bias_size(grid)``), ``ids
    [B, M]`` token ids -> ``[B, heads, 1 + M, 1 + M]``, query first: the bias
    between two tokens depends on their grid positions only, so any subset of
    the grid in any order gets the full grid's bias restricted to it. ``ids =
    None`` (every token, grid order) -> ``[heads, 1 + N, 1 + N]``, one for the batch.
    """
    full = table[jnp.asarray(relative_position_index(tuple(grid)))]  # [1 + N, 1 + N, heads]
    if ids is None:
        return jnp.transpose(full, (2, 0, 1))
    sequence = jnp.concatenate([jnp.zeros((ids.shape[0], 1), ids.dtype), ids + 1], axis=1)  # index rows, cls = 0
    # One gather of [heads] rows per query/key pair: its gradient scatter-adds into the [1 + N, 1 + N]
    # pair table (at most B entries collide) and only then into the table's few hundred rows.
    pairs = full[sequence[:, :, None], sequence[:, None, :]]  # [B, T, T, heads]
    return nn.with_logical_constraint(jnp.transpose(pairs, (0, 3, 1, 2)), ("batch", "heads", None, None))
