"""The released pretraining checkpoints of every framework, read into the encoder module their fine-tuning uses.

``load(path, like)`` reads a file (``.pth``: its state dict under ``'model'``, under
mmengine's ``'state_dict'`` or at the top level; or ``.safetensors``), finds its layout
(``detect_layout``, or the one named) and returns ``(the pretrained encoder module, its
float32 numpy parameters)``: the sizes are those of ``like`` (the classifier's encoder), the
grid, window and options (a final norm, TEC's input adaptor, layer scale, a shared relative
table) the file's. The classifier's ``encoder.adapt_pretrained(params, pretrained)`` then
resizes and folds them into its own, as it does for a pretraining run. ``check`` does what
``load`` does on the names and shapes alone (``weight_files.read(..., data=False)``), so a
file of another framework or of other sizes stops before anything compiles, with a
``CheckpointMismatchError`` (a ``ValueError``) that says what the file holds and the fix.

``mae``: facebookresearch/mae's ``mae_pretrain_vit_*.pth`` (``{'model'}``), timm's ViT names
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.*``, ``norm``; the table of
  ``mae_checkpoint``) -> ``vit.Encoder``. Ignored: MAE's decoder (``mask_token``, ``decoder_*``)
  and heads (``vit_checkpoint.DROPPED``); DeiT's, DINO's and iBOT's releases read the same.
``simmim_vit``: microsoft/SimMIM's ViT (``{'model'}``): ``encoder.`` and BEiT's names (the table
  of ``hf_simmim``: ``blocks.{i}.gamma_{1,2}``, ``attn.qkv.weight`` without bias and ``attn.{q,v}_bias``,
  one ``rel_pos_bias.relative_position_bias_table`` for all blocks, no ``pos_embed``), or BEiT's own
  layout (no prefix, the table copied into every block: what ``export`` writes) -> ``SimMIMEncoder``
  (layer scale, ``relative_position_bias='shared'``, ``position_embedding='none'``, or ``'learned'``
  with a ``pos_embed``). Ignored: ``encoder.mask_token``, the pixel head ``decoder.0``, the index buffers.
``localmim``: Haoqing-Wang/LocalMIM (``{'model'}``): timm's names but ``norm.{0..K-1}``, the
  norms of its K tapped blocks (ViT-B: 2, 4, 10, 12 counted from 1), the last of which is the final
  norm -> ``vit.Encoder``. Ignored: the other taps' norms, ``decoder.*``, ``hog_enc.*``.
``tec``: sail-sg/TEC's release (a flat state dict written by its ``weight_convert.py``: the input
  MLP folded into ``cls_token``, no ``norm``) -> ``vit.Encoder`` without a final norm; its training
  file (``{'model'}``: ``cls_token_mlp.fc{1,2}``, ``norm``) -> ``vit.Encoder(cls_token_mlp=True)``.
  Ignored: ``encoder_adaptor.*``, ``forward_fea_decoder.*``, ``forward_att_decoder.*``,
  ``decoder_blocks.*``, ``decoder_pos_embed``.
``mmpretrain_vit``: open-mmlab/mmpretrain's ViT (MFF's release), mmengine's ``{'meta',
  'state_dict'}``: ``backbone.`` and OpenMMLab's names (``export.mm_vit_key``: ``layers.{i}.ln1``,
  ``ffn.layers.0.0``, ..., the final norm ``ln1``) -> ``vit.Encoder``. Ignored: MFF's fusion
  (``backbone.proj_layers.*``, ``backbone.proj_weights``), the decoder ``neck.*``, ``data_preprocessor.*``.
``swin``: the official or timm Swin, bare or under ``encoder.`` (GreenMIM's and SimMIM's
  ``{'model'}``; ``swin_checkpoint``'s table) -> ``SwinTransformer`` (``like`` itself: the tables
  are resized to its windows). Ignored: the decoders, mask tokens, buffers and a head.

A plain ViT's number of heads cannot be read from its file; it is ``like``'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable

import numpy as np

from prmim_jax.interop import export, hf_simmim, mae_checkpoint, swin_checkpoint, vit_checkpoint, weight_files
from prmim_jax.interop.mae_checkpoint import CheckpointMismatchError
from prmim_jax.models import classifier, simmim, vit

AUTO = "auto"
WRAPPER_KEYS = ("model", "state_dict")  # the official releases' and mmengine's
SWIN_KEY = re.compile(r"(encoder\.)?layers\.\d+\.blocks\.\d+\.")
TAP_NORM = re.compile(r"norm\.(\d+)\.(weight|bias)")
LOCALMIM_EXTRAS = ("decoder.", "hog_enc.")
TEC_EXTRAS = (
    "encoder_adaptor.",
    "forward_fea_decoder.",
    "forward_att_decoder.",
    "decoder_blocks.",
    "decoder_pos_embed",
)
MMPRETRAIN_EXTRAS = ("backbone.proj_layers.", "backbone.proj_weights", "neck.", "data_preprocessor.")
SIMMIM_EXTRAS = ("encoder.mask_token", "decoder.")
INDEX_SUFFIX = "relative_position_index"


@dataclasses.dataclass(frozen=True)
class Layout:
    """One layout of the module docstring: ``holds`` (what its files hold, for messages), ``family`` (the encoder
    family it reads into: ``export.FAMILIES``, the classifier's ``model.architecture``), ``encoder_keys``
    (a state dict -> the encoder's keys under the names its family's reader takes, the ignored keys left out)."""

    name: str
    holds: str
    family: str
    encoder_keys: Callable[[dict], dict]


def _without(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _localmim_keys(state_dict: dict) -> dict:
    """timm's names, the last tap's ``norm.{K-1}`` as the final ``norm``."""
    taps = [int(m.group(1)) for k in state_dict if (m := TAP_NORM.fullmatch(k)) and m.group(2) == "weight"]
    last = max(taps, default=None)
    out = {}
    for key, value in _without(state_dict, LOCALMIM_EXTRAS).items():
        tap = TAP_NORM.fullmatch(key)
        if tap is None:
            out[key] = value
        elif int(tap.group(1)) == last:  # the other taps' norms feed the decoders
            out[f"norm.{tap.group(2)}"] = value
    return vit_checkpoint.encoder_state_dict(out)


def _timm_vit_keys(depth: int) -> list[str]:
    """Every key of a timm ViT encoder of ``depth`` blocks (``mae_checkpoint``'s table)."""
    blocks = [key for i in range(depth) for key in mae_checkpoint.block_shapes(f"blocks.{i}", 0, 0)]
    return [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *blocks,
        "norm.weight",
        "norm.bias",
    ]


def _mmpretrain_keys(state_dict: dict) -> dict:
    """``backbone.*`` renamed back to timm's names through ``export.mm_vit_key`` (the names export writes)."""
    backbone = {k.removeprefix("backbone."): v for k, v in _without(state_dict, MMPRETRAIN_EXTRAS).items()}
    depth = sum(f"layers.{i}.ln1.weight" in backbone for i in range(len(backbone)))
    timm_names = {export.mm_vit_key(key): key for key in _timm_vit_keys(depth)}
    return {timm_names.get(k, k): v for k, v in backbone.items()}  # anything else stays, and is unexpected


def _simmim_keys(state_dict: dict) -> dict:
    """BEiT's names: the ``encoder.`` prefix removed (when the file has it), mask token and pixel head left out."""
    prefix = "encoder." if "encoder.patch_embed.proj.weight" in state_dict else ""
    return {k.removeprefix(prefix): v for k, v in _without(state_dict, SIMMIM_EXTRAS).items()}


_LAYOUTS = (
    Layout("mae", "an MAE ViT in timm's names", "vit", vit_checkpoint.encoder_state_dict),
    Layout("simmim_vit", "a SimMIM ViT (layer scale, shared relative position bias)", "simmim_vit", _simmim_keys),
    Layout("localmim", "a LocalMIM ViT with a norm per tapped block", "vit", _localmim_keys),
    Layout(
        "tec",
        "a TEC ViT in timm's names",
        "vit",
        lambda state_dict: vit_checkpoint.encoder_state_dict(_without(state_dict, TEC_EXTRAS)),
    ),
    Layout("mmpretrain_vit", "an mmpretrain ViT (MFF's release, backbone.*)", "vit", _mmpretrain_keys),
    Layout("swin", "a Swin Transformer (official / timm names; GreenMIM's or SimMIM's encoder.*)", "swin", dict),
)
LAYOUTS = tuple(layout.name for layout in _LAYOUTS)


def layout_named(name: str) -> Layout:
    """The ``Layout`` called ``name``; ``ValueError`` naming the choices for another."""
    for layout in _LAYOUTS:
        if layout.name == name:
            return layout
    raise ValueError(f"checkpoint layout {name!r} is not one of {LAYOUTS} (or {AUTO!r}: detected from the keys).")


def detect_layout(keys) -> str:
    """The layout of a state dict with ``keys`` (its wrapper removed): ``CheckpointMismatchError`` naming the
    layouts when none matches. The rules, in order: mmpretrain's ``backbone.patch_embed.projection``; Swin's
    ``[encoder.]layers.{s}.blocks.{j}``; SimMIM's / BEiT's ``[encoder.]blocks.0.attn.q_bias``; LocalMIM's tap
    norms ``norm.0``; TEC's ``cls_token_mlp``, adaptor, or timm's names without any final norm; MAE's timm names."""
    keys = set(keys)
    if "backbone.patch_embed.projection.weight" in keys:
        return "mmpretrain_vit"
    if any(SWIN_KEY.match(key) for key in keys):
        return "swin"
    if keys & {"encoder.blocks.0.attn.q_bias", "blocks.0.attn.q_bias"}:
        return "simmim_vit"
    if "blocks.0.attn.qkv.weight" in keys:
        if "norm.0.weight" in keys:
            return "localmim"
        tec = "cls_token_mlp.fc1.weight" in keys or any(k.startswith("encoder_adaptor.") for k in keys)
        if tec or not keys & {"norm.weight", "fc_norm.weight"}:
            return "tec"
        return "mae"
    sample = sorted(keys)[:4]
    raise CheckpointMismatchError(
        f"the file's keys ({sample}, ... {len(keys)} in all) match none of the layouts {LAYOUTS}; name the "
        "file's layout, or convert the file to one of them."
    )


def check_family(layout: str, like) -> None:
    """``CheckpointMismatchError`` saying what a ``layout`` file holds and the ``model.architecture`` it fine-tunes
    with, unless ``like`` (the classifier's encoder) is of its family."""
    found, family = layout_named(layout), like.architecture["family"]
    if found.family != family:
        raise CheckpointMismatchError(
            f"the file holds {found.holds}, layout {found.name!r}, which the model's {family!r} encoder cannot "
            f"take: fine-tune it with {classifier.FINETUNING_HINTS[found.family]}."
        )


def _vit_module(state_dict: dict, like, channels: int | None) -> vit.Encoder:
    module = vit_checkpoint.encoder_module(state_dict, like, channels)
    if like.final_norm and not module.final_norm:
        raise CheckpointMismatchError(
            "the file holds a ViT without a final norm (TEC's release: weight_convert.py drops it), which the model's "
            "cls-token readout needs: fine-tune with model.pool='avg' (the mean of the tokens, then fc_norm)."
        )
    return module


def _simmim_module(state_dict: dict, like, channels: int | None) -> simmim.SimMIMEncoder:
    """The ``SimMIMEncoder`` a BEiT-named state dict holds (``like``'s sizes; the file's grid, channels and
    options), after checking every key and shape (index buffers aside: ``_simmim_params`` checks their values)."""
    per_block = f"blocks.0.{hf_simmim.BLOCK_TABLE}" in state_dict
    table = np.shape(state_dict.get(f"blocks.0.{hf_simmim.BLOCK_TABLE}" if per_block else hf_simmim.SHARED_TABLE, ()))
    found = vit_checkpoint.geometry(state_dict) | {"num_heads": table[-1] if table else None}
    holds = "the file holds a SimMIM ViT of " + ", ".join(f"{k}={v}" for k, v in found.items() if k != "side")
    wanted = dict(
        width=like.width, depth=like.depth, mlp_dim=like.mlp_dim, patch_size=like.patch_size, num_heads=like.num_heads
    )
    vit_checkpoint.check_sizes(found, wanted | ({} if channels is None else {"channels": channels}), holds)
    if found["side"] is None and not table:
        raise CheckpointMismatchError(f"{holds}, with neither a square position table nor a relative one.")
    side = found["side"] or (math.isqrt(table[0] - 3) + 1) // 2  # a table of (2 side - 1)^2 + 3 rows
    module = simmim.SimMIMEncoder(
        **vit.fields_of(like, vit.VitFields)
        | dict(image_size=(side * like.patch_size,) * 2, channels=found["channels"]),
        layer_scale_init=0.1 if "blocks.0.gamma_1" in state_dict else None,  # the values are the file's
        relative_position_bias="shared" if table else "none",
        position_embedding="learned" if "pos_embed" in state_dict else "none",
    )
    weights = {k: v for k, v in state_dict.items() if not k.endswith(INDEX_SUFFIX)}
    expected = hf_simmim.encoder_shapes(module, found["channels"], prefix="", per_block_tables=per_block)
    mae_checkpoint.check_keys(weights, expected, holds)
    return module


def _simmim_params(state_dict: dict, module: simmim.SimMIMEncoder) -> dict:
    """``module``'s parameters, after checking the values ``_simmim_module`` could not: the index buffers are
    BEiT's, and a per-block table (BEiT's layout) is one table copied into every block."""
    for key in (k for k in state_dict if k.endswith(INDEX_SUFFIX)):
        hf_simmim.check_index(state_dict[key], module.grid, key)
    tables = [state_dict[k] for i in range(module.depth) if (k := f"blocks.{i}.{hf_simmim.BLOCK_TABLE}") in state_dict]
    if any(not np.array_equal(table, tables[0]) for table in tables):
        raise CheckpointMismatchError(
            "the file's blocks hold different relative position tables: a fine-tuned BEiT, not a SimMIM pretraining "
            "(one table shared by all blocks)."
        )
    return hf_simmim.encoder_from_official(state_dict, module, prefix="")


def _swin_module(state_dict: dict, like, channels: int | None):
    """``like`` itself, after checking the file's Swin against it (``swin_checkpoint.check_state_dict``): a Swin's
    tables carry their window, and are resized to ``like``'s as they are read."""
    del channels  # ``like`` has its own, which the patch embedding's shape is checked against
    swin_checkpoint.check_state_dict(state_dict, like)
    return like


# Per family: (state dict in the reader's names, like, channels) -> the checked module; (state dict, module) -> params.
_READERS = {
    "vit": (_vit_module, vit_checkpoint.encoder_params),
    "simmim_vit": (_simmim_module, _simmim_params),
    "swin": (_swin_module, swin_checkpoint.from_state_dict),
}


def _checked(state_dict: dict, like, layout: str, channels: int | None):
    """``(Layout, the file's encoder keys in its reader's names, the checked pretrained module)``."""
    found = layout_named(detect_layout(state_dict) if layout == AUTO else layout)
    check_family(found.name, like)
    keys = found.encoder_keys(state_dict)
    return found, keys, _READERS[found.family][0](keys, like, channels)


def _read(path: str | os.PathLike, like, layout: str, data: bool) -> dict:
    if layout != AUTO:
        check_family(layout, like)  # before the file is opened: the config alone tells
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {os.fspath(path)}; point it at the downloaded checkpoint.")
    return weight_files.read(path, WRAPPER_KEYS, data=data)


def check(path: str | os.PathLike, like, layout: str = AUTO, channels: int | None = None) -> str:
    """The layout of the checkpoint at ``path`` after checking, from its names and shapes alone, that ``load`` reads
    it into ``like``'s family and sizes (and ``channels``, when given); the errors of the module docstring."""
    found, _, _ = _checked(_read(path, like, layout, data=False), like, layout, channels)
    return found.name


def load(path: str | os.PathLike, like, layout: str = AUTO, channels: int | None = None):
    """``(pretrained encoder module, its float32 numpy parameters)`` of the checkpoint at ``path`` in ``layout``
    (``'auto'``: ``detect_layout``), of ``like``'s sizes; see the module docstring."""
    found, keys, module = _checked(_read(path, like, layout, data=True), like, layout, channels)
    return module, _READERS[found.family][1](keys, module)
