"""Plain ViT encoders from official checkpoints in timm's key layout: MAE, DeiT, DINO, iBOT (TEC's teachers).

The encoder keys are those of ``mae_checkpoint``'s table (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``), with
one difference: ``pos_embed [1, 1 + N, D]`` is read as it is (DeiT, DINO and
iBOT learn it; MAE stores its fixed table) into a learned position table,
resized bicubically when its grid is not the model's
(``vit.interpolate_pos_embedding``). What the releases wrap around it:

==============================  ===============================================
release                         layout
==============================  ===============================================
MAE ``mae_pretrain_vit_*.pth``  ``{'model': encoder}``
DeiT ``deit_*.pth``             ``{'model': encoder + head.*}``
DINO ``dino_vit*_pretrain.pth``  encoder at the top level
iBOT ``checkpoint_teacher.pth``  ``{'state_dict': encoder}``
DINO / iBOT training files      ``{'teacher': backbone.* + head.*, ...}``
==============================  ===============================================

A ``module.`` and a ``backbone.`` prefix are removed; keys of heads and
decoders (``head``, ``head_dist``, ``fc_norm``, ``masked_embed``, MAE's
``mask_token`` and ``decoder_*``) are dropped; anything else unexpected, a
missing key or a wrong shape is a ``CheckpointMismatchError`` naming it. A
distilled DeiT (``dist_token``: two class tokens) is refused.
"""

from __future__ import annotations

import math
import os
import types

import jax.numpy as jnp
import numpy as np

from prmim_jax.interop import weight_files
from prmim_jax.interop.mae_checkpoint import (
    CheckpointMismatchError,
    block_from_torch,
    expected_shapes,
    norm_from_torch,
    patch_kernel_from_torch,
)
from prmim_jax.models import vit

WRAPPER_KEYS = ("model", "state_dict", "teacher")
PREFIXES = ("module.", "backbone.")
DROPPED = ("head.", "head_dist.", "fc_norm.", "masked_embed", "mask_token", "decoder_")


def encoder_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A release's state dict (unwrapped) -> the encoder keys only, prefixes removed, float32."""
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        if key == "dist_token":
            raise CheckpointMismatchError(
                "this is a distilled DeiT (dist_token: a second class token); use a plain DeiT, DINO, iBOT or MAE ViT."
            )
        if not key.startswith(DROPPED):
            out[key] = np.asarray(value, dtype=np.float32)
    return out


def from_state_dict(state_dict: dict[str, np.ndarray], encoder: vit.Encoder, channels: int) -> dict:
    """An official ViT state dict -> the parameters of ``encoder`` (``learned_pos_embedding``) for images of
    ``channels`` channels (float32 numpy): ``{'cls_token', 'pos_embedding', 'patch_embed', 'transformer'}``."""
    if not encoder.learned_pos_embedding:
        raise ValueError("the encoder must have a learned position table (learned_pos_embedding=True).")
    sd = encoder_state_dict(state_dict)
    geometry = types.SimpleNamespace(
        width=encoder.width,
        decoder_width=0,
        depth=encoder.depth,
        mlp_dim=encoder.mlp_dim,
        patch_size=encoder.patch_size,
        grid=encoder.grid,
        channels=channels,
    )
    expected = expected_shapes(geometry, include_decoder=False)
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:5]}); "
            f"is this a plain ViT of width {encoder.width} and depth {encoder.depth}?"
        )
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointMismatchError(f"missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:5]}).")
    for key, shape in expected.items():
        if key != "pos_embed" and sd[key].shape != shape:
            raise CheckpointMismatchError(f"key {key!r} has shape {sd[key].shape}; the teacher expects {shape}.")
    shape = sd["pos_embed"].shape
    stored_side = math.isqrt(shape[1] - 1) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != 1 or shape[2] != encoder.width or stored_side**2 != shape[1] - 1:
        raise CheckpointMismatchError(f"key 'pos_embed' has shape {shape}; expected [1, 1 + side^2, {encoder.width}].")
    table = sd["pos_embed"][0]
    table = np.asarray(vit.interpolate_pos_embedding(jnp.asarray(table), (stored_side,) * 2, encoder.grid))
    return {
        "cls_token": sd["cls_token"],
        "pos_embedding": table,
        "patch_embed": {
            "kernel": patch_kernel_from_torch(sd["patch_embed.proj.weight"]),
            "bias": sd["patch_embed.proj.bias"],
        },
        "transformer": {
            f"block_{i}": block_from_torch(sd, f"blocks.{i}", encoder.num_heads) for i in range(encoder.depth)
        }
        | {"norm": norm_from_torch(sd, "norm")},
    }


def load(path: str | os.PathLike, encoder: vit.Encoder, channels: int) -> dict:
    """Reads an official ViT checkpoint (``.pth`` or ``.safetensors``, any layout of the table) for ``encoder``."""
    return from_state_dict(weight_files.read(path, key=WRAPPER_KEYS), encoder, channels)
