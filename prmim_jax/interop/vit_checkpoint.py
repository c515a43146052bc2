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

import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax.interop import weight_files
from prmim_jax.interop.mae_checkpoint import (
    CheckpointMismatchError,
    block_from_torch,
    check_keys,
    expected_shapes,
    linear_from_torch,
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


def describe(state_dict) -> str:
    """What plain ViT a timm-layout state dict holds (its arrays, or ``weight_files.read(..., data=False)``'s
    stand-ins), for error messages: width, depth, MLP width, patch size, channels, position grid."""
    found = geometry(state_dict)
    grid = "?" if found["side"] is None else f"{found['side']}x{found['side']}"
    return ", ".join(f"{name}={value}" for name, value in found.items() if name != "side") + f", position grid {grid}"


def geometry(state_dict) -> dict:
    """The sizes a ViT state dict in timm's (or BEiT's) names holds, None where the key that tells is absent:
    ``width``, ``depth``, ``mlp_dim``, ``patch_size``, ``channels``, and ``side`` of the square grid of its
    ``pos_embed``."""

    def dim(key, axis):
        shape = np.shape(state_dict[key]) if key in state_dict else ()
        return shape[axis] if len(shape) > max(axis, -axis - 1) else None

    positions = dim("pos_embed", 1)
    side = math.isqrt(positions - 1) if positions else None
    return dict(
        width=dim("cls_token", -1),
        depth=sum(f"blocks.{i}.norm1.weight" in state_dict for i in range(len(state_dict))),
        mlp_dim=dim("blocks.0.mlp.fc1.weight", 0),
        patch_size=dim("patch_embed.proj.weight", -1),
        channels=dim("patch_embed.proj.weight", 1),
        side=side if side is not None and side * side == positions - 1 else None,
    )


def check_sizes(found: dict, wanted: dict, holds: str) -> None:
    """``CheckpointMismatchError`` unless the sizes ``found`` in a file (``geometry``'s names) are those ``wanted``
    by the model; the message says what the file ``holds`` (``'the file holds a ViT of ...'``) and the fix."""
    differ = [name for name, value in wanted.items() if found.get(name) != value]
    if differ:
        model = ", ".join(f"{name}={value}" for name, value in wanted.items())
        raise CheckpointMismatchError(
            f"{holds}, but the model has {model}: set the model's {'/'.join(differ)} (its variant, or width, depth, "
            "num_heads, mlp_ratio, patch_size, channels) to the file's."
        )


def encoder_module(state_dict, like: vit.Encoder, channels: int | None = None) -> vit.Encoder:
    """The ``vit.Encoder`` a timm-layout encoder state dict (encoder keys only; arrays or ``data=False`` stand-ins)
    holds, after checking every key and shape against ``like``'s sizes (and ``channels``, when given).

    Its sizes are ``like``'s, its grid the one of the stored ``pos_embed [1, 1 + side^2, D]`` (read as a learned
    table: MAE's fixed sin-cos one as much as DeiT's), a final norm when ``norm.*`` is there, TEC's input adaptor
    (``cls_token_mlp``) when ``cls_token_mlp.fc{1,2}.*`` are. ``CheckpointMismatchError`` naming what the file
    holds and the fix otherwise. The number of heads cannot be read from a file: it is ``like``'s.
    """
    found = geometry(state_dict)
    wanted = dict(width=like.width, depth=like.depth, mlp_dim=like.mlp_dim, patch_size=like.patch_size)
    check_sizes(
        found,
        wanted | ({} if channels is None else {"channels": channels}),
        holds=f"the file holds a ViT of {describe(state_dict)}",
    )
    if found["side"] is None:
        raise CheckpointMismatchError(
            f"key 'pos_embed' has shape {np.shape(state_dict.get('pos_embed'))}; expected [1, 1 + side^2, "
            f"{like.width}] (a square grid of tokens after the cls token)."
        )
    has_norm, has_mlp = "norm.weight" in state_dict, "cls_token_mlp.fc1.weight" in state_dict
    module = like.clone(
        image_size=(found["side"] * like.patch_size,) * 2,
        learned_pos_embedding=True,
        final_norm=has_norm,
        cls_token_mlp=has_mlp,
        frozen_blocks=0,
        drop_path_rate=0.0,
        taps=None,
        parent=None,
    )
    sizes = types.SimpleNamespace(
        width=like.width,
        decoder_width=0,
        depth=like.depth,
        mlp_dim=like.mlp_dim,
        patch_size=like.patch_size,
        grid=module.grid,
        channels=found["channels"],
    )
    expected = expected_shapes(sizes, include_decoder=False)
    if not has_norm:
        del expected["norm.weight"], expected["norm.bias"]
    if has_mlp:  # timm's Mlp(D, 4D): the official TECViT's cls_token_mlp
        for fc, shape in (("fc1", (4 * like.width, like.width)), ("fc2", (like.width, 4 * like.width))):
            expected |= {f"cls_token_mlp.{fc}.weight": shape, f"cls_token_mlp.{fc}.bias": shape[:1]}
    check_keys(state_dict, expected, f"the file holds a ViT of {describe(state_dict)}")
    return module


def encoder_params(state_dict, module: vit.Encoder) -> dict:
    """The parameters of ``module`` (``encoder_module``'s, which checked ``state_dict``) from ``state_dict``,
    float32 numpy: ``cls_token``, ``pos_embedding [1 + N, D]``, ``patch_embed``, ``transformer`` (blocks, final
    norm if any), ``cls_token_mlp`` if any."""
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    params = {
        "cls_token": sd["cls_token"],
        "pos_embedding": sd["pos_embed"][0],
        "patch_embed": {
            "kernel": patch_kernel_from_torch(sd["patch_embed.proj.weight"]),
            "bias": sd["patch_embed.proj.bias"],
        },
        "transformer": {
            f"block_{i}": block_from_torch(sd, f"blocks.{i}", module.num_heads) for i in range(module.depth)
        },
    }
    if module.final_norm:
        params["transformer"]["norm"] = norm_from_torch(sd, "norm")
    if module.cls_token_mlp:
        params["cls_token_mlp"] = {fc: linear_from_torch(sd, f"cls_token_mlp.{fc}") for fc in ("fc1", "fc2")}
    return params


def from_state_dict(state_dict: dict[str, np.ndarray], encoder: vit.Encoder, channels: int) -> dict:
    """An official ViT state dict -> the parameters of ``encoder`` (``learned_pos_embedding``) for images of
    ``channels`` channels (float32 numpy): ``{'cls_token', 'pos_embedding', 'patch_embed', 'transformer'}``, the
    stored table resized to ``encoder``'s grid, TEC's input adaptor (a TEC training file) folded into the cls token."""
    if not encoder.learned_pos_embedding:
        raise ValueError("the encoder must have a learned position table (learned_pos_embedding=True).")
    sd = encoder_state_dict(state_dict)
    stored = encoder_module(sd, encoder, channels)
    if not stored.final_norm:
        raise CheckpointMismatchError("missing key 'norm.weight': the file's ViT has no final norm.")
    params = vit.fold_cls_token_mlp(encoder_params(sd, stored))
    table = vit.interpolate_pos_embedding(jnp.asarray(params["pos_embedding"]), stored.grid, encoder.grid)
    return jax.tree.map(np.asarray, params | {"pos_embedding": table})


def load(path: str | os.PathLike, encoder: vit.Encoder, channels: int) -> dict:
    """Reads an official ViT checkpoint (``.pth`` or ``.safetensors``, any layout of the table) for ``encoder``."""
    return from_state_dict(weight_files.read(path, key=WRAPPER_KEYS), encoder, channels)
