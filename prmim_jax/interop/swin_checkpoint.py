"""Official Swin (microsoft/Swin-Transformer) and timm checkpoints <-> our ``swin.SwinTransformer`` parameters.

The official layout, for a Swin of width ``C``, stages ``s = 0..S-1`` of
``depths[s]`` blocks at width ``C_s = C 2^s`` with ``h_s`` heads and (clipped)
window ``w_s``, patch ``p``, ``K`` channels (weights ``[out, in]`` as PyTorch
stores them):

=========================================================  ==============================  =============================
key                                                        shape                           our parameter
=========================================================  ==============================  =============================
``patch_embed.proj.weight``, ``.bias``                     ``[C, K, p, p]``, ``[C]``       ``patch_embed``
``patch_embed.norm.{weight,bias}``                         ``[C]``                         ``patch_norm``
``layers.{s}.blocks.{j}.norm1.*``, ``norm2.*``             ``[C_s]``                       ``stage_{s}/block_{j}/norm1``
``layers.{s}.blocks.{j}.attn.qkv.weight``, ``.bias``       ``[3C_s, C_s]`` = ``[q; k; v]``  ``.../attn/{query,key,value}``
``layers.{s}.blocks.{j}.attn.proj.weight``, ``.bias``      ``[C_s, C_s]``, ``[C_s]``       ``.../attn/out``
``layers.{s}.blocks.{j}.attn.relative_position_bias_table``  ``[(2w_s - 1)^2, h_s]``       ``.../attn/relative_position_``
                                                                                           ``bias_table``
``layers.{s}.blocks.{j}.mlp.fc1.*``, ``fc2.*``             ``[4C_s, C_s]``, ``[C_s, 4C_s]``  ``.../mlp/fc1``, ``fc2``
``layers.{s}.downsample.reduction.weight`` (``s < S-1``)   ``[2C_s, 4C_s]``                ``stage_{s}/downsample/``
``layers.{s}.downsample.norm.{weight,bias}``               ``[4C_s]``                      ``reduction``, ``norm``
``norm.{weight,bias}``                                     ``[C_{S-1}]``                   ``norm``
``head.weight``, ``.bias`` (classifiers)                   ``[classes, C_{S-1}]``          ``head``
=========================================================  ==============================  =============================

plus two buffers the official model saves and we recompute:
``layers.{s}.blocks.{j}.attn.relative_position_index`` ``[w_s^2, w_s^2]`` int64
(``swin.relative_position_index``) and, for shifted blocks, ``layers.{s}.blocks.{j}.attn_mask``
``[nW, w_s^2, w_s^2]`` float32 (``swin.shifted_window_mask``). Import ignores them; export
writes them as the official model has them.

timm (0.9 and later) renames two things: patch merging moved to the start of the next
stage, ``layers.{s + 1}.downsample.*`` for the official ``layers.{s}.downsample.*``, and
the head is ``head.fc.{weight,bias}``; its buffers are not saved. ``detect_layout`` tells
the two apart from the keys (which stage holds a ``downsample``; the head's name).

Import (``from_state_dict``, ``load``) also reads a SimMIM-style pretraining checkpoint whose
Swin lives under ``encoder.`` (its mask token and decoder are skipped), resizes relative
position tables bicubically when the checkpoint's window differs from the model's
(``swin.resize_relative_position_table``), drops a head when the model has none, and raises
``CheckpointMismatchError`` (a ``ValueError``) naming missing / unexpected keys and what the
checkpoint's architecture is. Conversion is otherwise exact (transposes and reshapes).
"""

from __future__ import annotations

import os
import re

import numpy as np

from prmim_jax.interop import mae_checkpoint, weight_files
from prmim_jax.interop.mae_checkpoint import CheckpointMismatchError
from prmim_jax.models import swin

LAYOUTS = ("official", "timm")
BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask")
ENCODER_PREFIX = "encoder."  # SimMIM / GreenMIM-style pretraining checkpoints: the Swin is their encoder
_TABLE = "attn.relative_position_bias_table"


def _downsample_prefix(stage: int, layout: str) -> str:
    return f"layers.{stage + 1 if layout == 'timm' else stage}.downsample"


def _head_prefix(layout: str) -> str:
    return "head.fc" if layout == "timm" else "head"


def detect_layout(keys, num_stages: int) -> str:
    """``'official'`` or ``'timm'`` for a state dict's ``keys`` of a ``num_stages``-stage Swin.

    Official checkpoints hold ``layers.0.downsample`` (merging after stage 0),
    timm's ``layers.{S-1}.downsample`` (merging before the last stage); a
    one-stage Swin has neither, and its head (``head.fc`` in timm) decides;
    with neither, both layouts are the same and ``'official'`` is returned.
    """
    keys = set(keys)
    if any(k.startswith("layers.0.downsample.") for k in keys):
        return "official"
    if any(k.startswith(f"layers.{num_stages - 1}.downsample.") for k in keys) or "head.fc.weight" in keys:
        return "timm"
    return "official"


def expected_shapes(
    model: swin.SwinTransformer, layout: str = "official", num_classes: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Every parameter key of a checkpoint of ``model``'s architecture, with its shape (buffers aside).

    ``num_classes``: the head's classes (None: ``model.num_classes``; 0: no head).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}.")
    num_classes = model.num_classes if num_classes is None else num_classes
    c = model.width
    shapes = {
        "patch_embed.proj.weight": (c, model.channels, model.patch_size, model.patch_size),
        "patch_embed.proj.bias": (c,),
        "patch_embed.norm.weight": (c,),
        "patch_embed.norm.bias": (c,),
    }
    stages = model.stages
    for s, layout_s in enumerate(stages):
        d, mlp = layout_s.width, int(layout_s.width * model.mlp_ratio)
        if layout == "timm" and s > 0:
            shapes |= _downsample_shapes(s - 1, stages[s - 1].width, layout)
        table = (swin.relative_position_table_size((layout_s.window,) * 2), layout_s.num_heads)
        for j in range(layout_s.depth):
            prefix = f"layers.{s}.blocks.{j}"
            shapes |= mae_checkpoint.block_shapes(prefix, d, mlp) | {f"{prefix}.{_TABLE}": table}
        if layout == "official" and s < len(stages) - 1:
            shapes |= _downsample_shapes(s, d, layout)
    last = stages[-1].width
    shapes |= {"norm.weight": (last,), "norm.bias": (last,)}
    if num_classes:
        head = _head_prefix(layout)
        shapes |= {f"{head}.weight": (num_classes, last), f"{head}.bias": (num_classes,)}
    return shapes


def _downsample_shapes(stage: int, width: int, layout: str) -> dict[str, tuple[int, ...]]:
    prefix = _downsample_prefix(stage, layout)
    return {
        f"{prefix}.reduction.weight": (2 * width, 4 * width),
        f"{prefix}.norm.weight": (4 * width,),
        f"{prefix}.norm.bias": (4 * width,),
    }


def official_buffers(model: swin.SwinTransformer) -> dict[str, np.ndarray]:
    """The buffers an official checkpoint of ``model`` holds: every block's ``relative_position_index`` (int64)
    and every shifted block's ``attn_mask`` (float32, 0 / -100)."""
    buffers = {}
    for s, layout in enumerate(model.stages):
        for j in range(layout.depth):
            prefix = f"layers.{s}.blocks.{j}"
            index = swin.relative_position_index((layout.window, layout.window))
            buffers[f"{prefix}.attn.relative_position_index"] = index.astype(np.int64)
            if j % 2 and layout.shift:
                buffers[f"{prefix}.attn_mask"] = swin.shifted_window_mask(layout.grid, layout.window, layout.shift)
    return buffers


def to_state_dict(params: dict, model: swin.SwinTransformer, layout: str = "official") -> dict[str, np.ndarray]:
    """Our (possibly boxed) ``SwinTransformer`` parameters -> a state dict in ``layout`` (``'official'`` with its
    buffers, or ``'timm'``), float32 numpy (the index buffers int64). A ``head`` in ``params`` is written."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}.")
    params = mae_checkpoint.to_numpy(params)
    out = {
        "patch_embed.proj.weight": mae_checkpoint.patch_kernel_to_torch(
            params["patch_embed"]["kernel"], model.patch_size, model.channels
        ),
        "patch_embed.proj.bias": params["patch_embed"]["bias"],
    }
    out["patch_embed.norm.weight"], out["patch_embed.norm.bias"] = mae_checkpoint.norm_to_torch(
        params["patch_norm"]
    ).values()
    buffers = official_buffers(model) if layout == "official" else {}
    for s, stage in enumerate(model.stages):
        for j in range(stage.depth):
            prefix, block = f"layers.{s}.blocks.{j}", params[f"stage_{s}"][f"block_{j}"]
            if f"{prefix}.attn_mask" in buffers:
                out[f"{prefix}.attn_mask"] = buffers[f"{prefix}.attn_mask"]
            mae_checkpoint.block_to_torch(block, prefix, out)
            out[f"{prefix}.{_TABLE}"] = block["attn"]["relative_position_bias_table"]
            if f"{prefix}.attn.relative_position_index" in buffers:
                out[f"{prefix}.attn.relative_position_index"] = buffers[f"{prefix}.attn.relative_position_index"]
        if s < len(model.stages) - 1:
            merge, prefix = params[f"stage_{s}"]["downsample"], _downsample_prefix(s, layout)
            out[f"{prefix}.reduction.weight"] = merge["reduction"]["kernel"].T
            out[f"{prefix}.norm.weight"], out[f"{prefix}.norm.bias"] = mae_checkpoint.norm_to_torch(
                merge["norm"]
            ).values()
    out["norm.weight"], out["norm.bias"] = mae_checkpoint.norm_to_torch(params["norm"]).values()
    if "head" in params:
        head = _head_prefix(layout)
        out[f"{head}.weight"], out[f"{head}.bias"] = mae_checkpoint.linear_to_torch(params["head"]).values()
    return {k: np.ascontiguousarray(v, dtype=v.dtype if k in buffers else np.float32) for k, v in out.items()}


def describe(state_dict) -> str:
    """What Swin a state dict holds, for error messages: ``width``, ``depths``, ``num_heads``, window, head."""
    keys = set(state_dict)
    blocks = {}
    for key in keys:
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    depths = tuple(blocks[s] for s in sorted(blocks))
    heads = tuple(
        state_dict[f"layers.{s}.blocks.0.{_TABLE}"].shape[-1]
        for s in sorted(blocks)
        if f"layers.{s}.blocks.0.{_TABLE}" in keys
    )
    width = state_dict["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in keys else "?"
    table = state_dict.get(f"layers.0.blocks.0.{_TABLE}")
    window = (int(np.sqrt(table.shape[0])) + 1) // 2 if table is not None else "?"
    head = next((state_dict[k].shape[0] for k in ("head.weight", "head.fc.weight") if k in keys), 0)
    return f"width={width}, depths={depths}, num_heads={heads}, window_size={window}, {head or 'no'} head classes"


def _encoder_keys(state_dict: dict) -> dict:
    """The Swin's own keys: a pretraining checkpoint's ``encoder.*`` (without its mask token), else all keys."""
    if "patch_embed.proj.weight" in state_dict or f"{ENCODER_PREFIX}patch_embed.proj.weight" not in state_dict:
        return state_dict
    return {
        k.removeprefix(ENCODER_PREFIX): v
        for k, v in state_dict.items()
        if k.startswith(ENCODER_PREFIX) and k != f"{ENCODER_PREFIX}mask_token"
    }


def check_state_dict(state_dict, model: swin.SwinTransformer) -> tuple[dict, str]:
    """``(the Swin's own keys of state_dict, buffers left out; its layout)``, after checking them against ``model``
    (arrays, or ``weight_files.read(..., data=False)``'s stand-ins): ``CheckpointMismatchError`` naming missing /
    unexpected keys or a shape that differs, with the checkpoint's architecture and the fix. A relative position
    table of another window passes (``from_state_dict`` resizes it); its heads must be the model's."""
    sd = {k: v for k, v in _encoder_keys(dict(state_dict)).items() if not k.endswith(BUFFER_SUFFIXES)}
    layout = detect_layout(sd, len(model.depths))
    expected = expected_shapes(model, layout)
    optional = set(expected_shapes(model, layout, num_classes=1)) - set(expected)  # a head the model does not use
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected and k not in optional)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:5]})")
        if unexpected:
            problems.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:5]})")
        raise CheckpointMismatchError(
            f"{'; '.join(problems)} in a {layout}-layout Swin checkpoint. The checkpoint holds {describe(sd)}; the "
            f"model has width={model.width}, depths={tuple(model.depths)}, num_heads={tuple(model.num_heads)}, "
            f"num_classes={model.num_classes}: set the model's variant / width / depths / num_heads (and "
            "num_classes, 0 for a backbone) to the checkpoint's."
        )
    for key, shape in expected.items():
        got = np.shape(sd[key])
        if got != shape and not (key.endswith(_TABLE) and got[-1:] == shape[-1:]):  # another window: resized
            raise CheckpointMismatchError(
                f"key {key!r} has shape {got}; the model expects {shape}. The checkpoint holds "
                f"{describe(sd)}: set the model's sizes to the checkpoint's."
            )
    return sd, layout


def from_state_dict(state_dict: dict, model: swin.SwinTransformer) -> dict:
    """An official or timm Swin state dict -> our ``SwinTransformer`` parameters (float32 numpy).

    The layout is detected (``detect_layout``); buffers are ignored; a head is
    read when ``model.num_classes > 0`` (and must then be there) and skipped
    otherwise; relative position tables of another window are resized to
    ``model``'s. Raises ``CheckpointMismatchError`` naming missing / unexpected
    keys or a shape that differs, with the checkpoint's architecture and the fix
    (``check_state_dict``).
    """
    sd, layout = check_state_dict(state_dict, model)
    expected = expected_shapes(model, layout)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items() if k in expected}
    for key in expected:
        if key.endswith(_TABLE):
            window = (model.stages[int(key.split(".")[1])].window,) * 2
            sd[key] = swin.resize_relative_position_table(sd[key], window)
    params = {
        "patch_embed": {
            "kernel": mae_checkpoint.patch_kernel_from_torch(sd["patch_embed.proj.weight"]),
            "bias": sd["patch_embed.proj.bias"],
        },
        "patch_norm": mae_checkpoint.norm_from_torch(sd, "patch_embed.norm"),
    }
    for s, stage in enumerate(model.stages):
        blocks = {}
        for j in range(stage.depth):
            prefix = f"layers.{s}.blocks.{j}"
            blocks[f"block_{j}"] = block = mae_checkpoint.block_from_torch(sd, prefix, stage.num_heads)
            block["attn"]["relative_position_bias_table"] = sd[f"{prefix}.{_TABLE}"]
        if s < len(model.stages) - 1:
            prefix = _downsample_prefix(s, layout)
            blocks["downsample"] = {
                "norm": mae_checkpoint.norm_from_torch(sd, f"{prefix}.norm"),
                "reduction": {"kernel": sd[f"{prefix}.reduction.weight"].T},
            }
        params[f"stage_{s}"] = blocks
    params["norm"] = mae_checkpoint.norm_from_torch(sd, "norm")
    if model.num_classes:
        params["head"] = mae_checkpoint.linear_from_torch(sd, _head_prefix(layout))
    return params


def load(path: str | os.PathLike, model: swin.SwinTransformer) -> dict:
    """Reads an official or timm Swin checkpoint (``.pth`` or ``.safetensors``); see ``from_state_dict``."""
    return from_state_dict(weight_files.read(path), model)


def save(params: dict, model: swin.SwinTransformer, path: str | os.PathLike, layout: str = "official") -> None:
    """Writes our parameters in ``layout``: ``.safetensors``, or ``torch.save({'model': ...})`` otherwise."""
    weight_files.write(to_state_dict(params, model, layout), path)
