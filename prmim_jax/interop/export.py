"""Our encoders in the layouts that downstream tools read: the official releases / timm, transformers, mmseg, mmdet.

Every function here takes ``(encoder module, its numpy parameters[, head])``, what a
method's ``encoder(params)`` returns, and never a run: ``prmim_jax.tools.export`` reads
the run. Three encoder families (``family``) and five formats (``FORMATS``):

=================  ==================================  ===============================  ============================
format             ``vit``: ``vit.Encoder`` (MAE,      ``simmim_vit``: ``SimMIMEncoder``  ``swin``: ``SwinTransformer``
                   partial, PR-MIM, LocalMIM, MFF,     (layer scale, shared             (GreenMIM; Swin
                   TEC's student; ViT classifiers)     relative bias)                   classifiers)
=================  ==================================  ===============================  ============================
``mae``            the official MAE release            refused: no MAE layout has       refused: no MAE layout
                   (``mae_pretrain_vit_*.pth``;        layer scale or relative bias
                   a classifier as
                   ``mae_finetuned_vit_*.pth``)
``timm``           the same (timm's ``VisionTransf-    BEiT (timm's ``Beit``,           the official Swin
                   ormer``: ``fc_norm``, ``head``)     SimMIM's fine-tuning)            (``swin2mmseg.py``, timm)
``transformers``   ``ViTModel`` (a ``pool='cls'``      ``BeitModel``                    ``SwinModel`` (classifier:
                   classifier: ``ViTForImage-                                           ``SwinForImage-
                   Classification``)                                                    Classification``)
``mmseg``          backbone ``MAE`` (``beit2mmseg``    backbone ``BEiT`` (``MAE`` with  ``SwinTransformer``
                   of the release); a classifier:      an absolute position table)      (``swin2mmseg``)
                   ``VisionTransformer``
                   (``vit2mmseg``)
``mmdet``          the ``mae`` file (mmdet's ViTDet    refused: no mmdet backbone       ``SwinTransformer``
                   project reads the release)          reads BEiT's layout              (its ``swin_converter``)
=================  ==================================  ===============================  ============================

``mae``, ``timm`` and mmdet's ViT files are ``{'model': state_dict}`` as the releases
are; mmseg's and mmdet's Swin files hold the state dict at the top level, as their
converters write it. Conversion is exact: transposes, reshapes and renames, plus
values that compute nothing (our key bias dropped: it adds one constant to all logits
of a query; mmseg's layer scale written as ones and its relative tables as zeros where
our encoder has none; a linear probe's BatchNorm folded into its linear head). Beyond
the converters, two things that they would drop are kept: the final norm goes to the
backbone's own final norm (mmseg ``ln1``, or ``norm{S-1}`` of the last Swin stage
output, other stages' output norms written as mmseg initialises them), so the
backbone's last features equal our encoder's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np

from prmim_jax.interop import hf_simmim, mae_checkpoint, swin_checkpoint, weight_files
from prmim_jax.models import layers, relative_position, simmim, swin, vit

FORMATS = ("mae", "timm", "transformers", "mmseg", "mmdet")
FAMILIES = ("vit", "simmim_vit", "swin")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# mmengine's checkpoint loader reads torch.save files only.
MM_SUFFIXES = (".pth", ".pt", ".bin")
VIT_LAYER_NORM_EPS = layers.LAYER_NORM_EPS
SWIN_LAYER_NORM_EPS = 1e-5  # PyTorch's default, the official Swin's (swin.LAYER_NORM_EPS)
# Classifier.head's BatchNorm (MAE's linear probe) normalises with this eps.
HEAD_NORM_EPS = 1e-6


class ExportError(ValueError):
    """An encoder, head or output path that a format cannot take; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Export:
    """One format's files for one encoder.

    ``state_dict``: ``{name: float32 array}`` (``relative_position_index`` buffers int64);
    ``wrapper``: the key the state dict is saved under (``'model'``) or None for the top level;
    ``config``: transformers' ``config.json`` (None for the other formats);
    ``reader``: the class that reads the file, for the user (``Export.reader`` is printed by the tool).
    """

    state_dict: dict[str, np.ndarray]
    wrapper: str | None
    reader: str
    config: dict | None = None


def family(encoder) -> str:
    """``'vit'``, ``'simmim_vit'`` or ``'swin'``: which table column ``encoder`` (a module) falls in, by its
    ``architecture``."""
    kind = getattr(encoder, "architecture", {}).get("family")
    if kind not in FAMILIES:
        raise ExportError(f"{type(encoder).__name__} is not an encoder this tool exports; it exports {FAMILIES}.")
    return kind


def check(encoder, fmt: str, head: dict | None = None) -> None:
    """Raises ``ExportError`` naming the fix when ``fmt`` cannot hold ``encoder`` (and ``head``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--to {fmt!r} is not a format; choose one of {FORMATS}.")
    kind = family(encoder)
    if fmt == "mae" and kind != "vit":
        what = "a Swin" if kind == "swin" else "a SimMIM ViT (layer scale, relative position bias)"
        raise ExportError(f"{what} has no official MAE layout; use --to timm (its own release layout) or mmseg.")
    if fmt == "mmdet" and kind == "simmim_vit":
        raise ExportError("no mmdet backbone reads a SimMIM ViT (BEiT layout); use --to mmseg, timm or transformers.")
    if fmt == "transformers" and head is not None and "fc_norm" in head:
        raise ExportError(
            "transformers' ViTForImageClassification reads the cls token after a final norm; this classifier pools "
            "the patch tokens into fc_norm (pool='avg'): use --to timm or mae (timm's global_pool='avg')."
        )


def convert(encoder, params: dict, fmt: str, head: dict | None = None) -> Export:
    """``encoder``'s (numpy or jax) ``params`` in ``fmt``; ``head``: a classifier's ``{'head', ['fc_norm'],
    ['head_norm': {'mean', 'var'}]}`` (written by ``mae``, ``timm`` and ``transformers``; mm* drop heads)."""
    check(encoder, fmt, head)
    params = mae_checkpoint.to_numpy(params)
    head = None if head is None else _folded_head(mae_checkpoint.to_numpy(head))
    kind = family(encoder)
    if fmt == "transformers":
        return _TRANSFORMERS[kind](encoder, params, head)
    if kind == "vit":
        release = vit_state_dict(encoder, params, head)
        if fmt in ("mae", "timm", "mmdet"):
            reader = "mmdet ViTDet ViT" if fmt == "mmdet" else "timm VisionTransformer / MAE"
            return Export(release, "model", reader)
        if head is not None:
            return Export(mm_vision_transformer(release), None, "mmseg VisionTransformer (vit2mmseg layout)")
        return Export(mm_beit(release, encoder.grid, encoder.num_heads), None, "mmseg MAE (beit2mmseg layout)")
    if kind == "simmim_vit":
        beit = hf_simmim.encoder_to_official(encoder, params)
        if fmt == "timm":
            return Export(beit, "model", "timm Beit")
        backbone = "MAE" if "pos_embed" in beit else "BEiT"
        return Export(
            mm_beit(beit, encoder.grid, encoder.num_heads, backbone), None, f"mmseg {backbone} (beit2mmseg layout)"
        )
    official = swin_state_dict(encoder, params, head)
    if fmt == "timm":
        return Export(official, "model", "timm SwinTransformer (official Swin layout)")
    return Export(mm_swin(official, encoder), None, f"{fmt} SwinTransformer (swin2mmseg layout)")


def _folded_head(head: dict) -> dict:
    """``head`` with a BatchNorm without affine (``head_norm`` running ``mean``/``var``) folded into the
    linear layer: ``W (x - m) / s + b = (W / s) x + (b - W m / s)``, ``s = sqrt(var + eps)``."""
    if "head_norm" not in head:
        return head
    scale = 1.0 / np.sqrt(head["head_norm"]["var"] + HEAD_NORM_EPS)
    kernel = head["head"]["kernel"] * scale[:, None]
    bias = head["head"]["bias"] - (head["head_norm"]["mean"] * scale) @ head["head"]["kernel"]
    return {k: v for k, v in head.items() if k != "head_norm"} | {"head": {"kernel": kernel, "bias": bias}}


# --- the release layouts (timm's names) ------------------------------------------------------------------


def vit_state_dict(encoder: vit.Encoder, params: dict, head: dict | None = None) -> dict[str, np.ndarray]:
    """A ViT encoder (and classifier head) in the official MAE / timm layout (``mae_checkpoint``'s table), float32:
    ``pos_embed`` is the learned table or the fixed sin-cos one; ``fc_norm.*`` and ``head.*`` with a head."""
    params = vit.fold_cls_token_mlp(params)  # TEC's input adaptor: the same cls token, as a plain ViT has it
    table = params.get("pos_embedding", vit.sincos_2d(encoder.width, encoder.grid))
    out = mae_checkpoint.encoder_to_torch(params, table, encoder.patch_size)
    if head is not None:
        if "fc_norm" in head:
            out["fc_norm.weight"], out["fc_norm.bias"] = mae_checkpoint.norm_to_torch(head["fc_norm"]).values()
        out["head.weight"], out["head.bias"] = mae_checkpoint.linear_to_torch(head["head"]).values()
    return _float32(out)


def swin_state_dict(encoder: swin.SwinTransformer, params: dict, head: dict | None = None) -> dict[str, np.ndarray]:
    """A Swin (and classifier head) in the official layout with its buffers (``swin_checkpoint``'s table)."""
    if head is not None:
        params = params | {"head": head["head"]}
    return swin_checkpoint.to_state_dict(params, encoder, "official")


def _float32(state_dict: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}


# --- mmseg / mmdet: the converters' renames, applied to the release layouts ------------------------------


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def mm_vit_key(key: str) -> str:
    """A timm ViT key -> its name in OpenMMLab's ViTs (``beit2mmseg.py``'s and ``vit2mmseg.py``'s shared renames;
    mmpretrain's ``VisionTransformer``, MFF's backbone, holds the same names): the final ``norm`` -> ``ln1``,
    ``patch_embed.proj`` -> ``patch_embed.projection``, ``blocks`` -> ``layers`` with ``norm{1,2}`` -> ``ln{1,2}``,
    ``mlp.fc1`` -> ``ffn.layers.0.0``, ``mlp.fc2`` -> ``ffn.layers.1``; other keys unchanged. Importers read it
    backwards (``interop.official``)."""
    if key.startswith("norm."):
        key = "ln1." + key.removeprefix("norm.")
    key = key.replace("patch_embed.proj.", "patch_embed.projection.")
    if key.startswith("blocks."):
        key = "layers." + key.removeprefix("blocks.")
        key = re.sub(r"\.norm([12])\.", r".ln\1.", key)
        key = _renamed(key, {".mlp.fc1.": ".ffn.layers.0.0.", ".mlp.fc2.": ".ffn.layers.1."})
    return key


def _mm_renamed(release: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``release`` renamed by ``mm_vit_key``, heads (``head``, ``fc_norm``) dropped."""
    return {mm_vit_key(k): v for k, v in release.items() if not k.startswith(("head.", "fc_norm."))}


def mm_beit(
    release: dict[str, np.ndarray], grid: tuple[int, int], num_heads: int, backbone: str = "MAE"
) -> dict[str, np.ndarray]:
    """A MAE or BEiT release layout of a ``grid`` of tokens -> mmseg's ``MAE`` or ``BEiT`` backbone keys
    (``beit2mmseg.py``'s renames).

    ``blocks`` -> ``layers``, ``norm{1,2}`` -> ``ln{1,2}``, ``mlp.fc1`` -> ``ffn.layers.0.0``, ``mlp.fc2``
    -> ``ffn.layers.1``, ``patch_embed.proj`` -> ``patch_embed.projection``; heads dropped. The backbone's
    other parameters are written with values that change nothing: layer scale ``gamma_{1,2}`` ones, relative
    tables zeros (``[(2H - 1)(2W - 1) + 3, heads]``); ``MAE`` takes one ``qkv.bias`` (key bias zero), ``BEiT``
    ``q_bias`` / ``v_bias``; the final ``norm`` becomes the backbone's ``ln1`` (``final_norm=True``).
    """
    if backbone not in ("MAE", "BEiT"):
        raise ValueError(f"backbone={backbone!r}; choose 'MAE' or 'BEiT'.")
    width = release["cls_token"].shape[-1]
    out = _mm_renamed(release)
    depth = sum(k.endswith(".ln1.weight") and k.startswith("layers.") for k in out)
    for i in range(depth):
        prefix = f"layers.{i}"
        out.setdefault(f"{prefix}.gamma_1", np.ones(width, np.float32))
        out.setdefault(f"{prefix}.gamma_2", np.ones(width, np.float32))
        if f"{prefix}.attn.relative_position_bias_table" not in out:
            rows = relative_position.relative_position_bias_size(tuple(grid))
            out[f"{prefix}.attn.relative_position_bias_table"] = np.zeros((rows, num_heads), np.float32)
        if backbone == "MAE" and f"{prefix}.attn.q_bias" in out:
            q_bias, v_bias = out.pop(f"{prefix}.attn.q_bias"), out.pop(f"{prefix}.attn.v_bias")
            out[f"{prefix}.attn.qkv.bias"] = np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])
        if backbone == "BEiT" and f"{prefix}.attn.qkv.bias" in out:
            raise ExportError("mmseg's BEiT backbone has no key bias; a plain ViT goes to its MAE backbone.")
    return out


def mm_vision_transformer(release: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A timm ViT layout -> mmseg's ``VisionTransformer`` keys (``vit2mmseg.py``'s renames; heads dropped):
    ``norm`` -> ``ln1``, ``patch_embed.proj`` -> ``patch_embed.projection``, ``blocks`` -> ``layers`` with
    ``norm{1,2}`` -> ``ln{1,2}``, ``attn.qkv`` -> ``attn.attn.in_proj_``, ``attn.proj`` -> ``attn.attn.out_proj``,
    ``mlp.fc{1,2}`` -> ``ffn.layers.0.0`` / ``ffn.layers.1``."""
    attention = {".attn.qkv.": ".attn.attn.in_proj_", ".attn.proj.": ".attn.attn.out_proj."}
    return {_renamed(k, attention) if k.startswith("layers.") else k: v for k, v in _mm_renamed(release).items()}


def _unfold_order(x: np.ndarray) -> np.ndarray:
    """Patch merging's input channels ``[x0; x1; x2; x3]`` (the official concatenation: (0, 0), (1, 0), (0, 1),
    (1, 1) offsets, each ``C`` wide) -> mmcv's ``nn.Unfold`` order (channel-major over the (0, 0), (0, 1), (1, 0),
    (1, 1) offsets), on the last axis; ``swin2mmseg.py``'s ``correct_unfold_*_order``."""
    *lead, four_c = x.shape
    parts = x.reshape(*lead, 4, four_c // 4)[..., [0, 2, 1, 3], :]
    return np.swapaxes(parts, -1, -2).reshape(*lead, four_c)


def mm_swin(official: dict[str, np.ndarray], encoder: swin.SwinTransformer) -> dict[str, np.ndarray]:
    """The official Swin layout -> mmseg's / mmdet's ``SwinTransformer`` keys (``swin2mmseg.py``, mmdet's
    ``swin_converter``): ``layers`` -> ``stages``, ``attn`` -> ``attn.w_msa``, ``mlp.fc{1,2}`` -> ``ffn.layers.0.0``
    / ``ffn.layers.1``, ``patch_embed.proj`` -> ``patch_embed.projection``, patch merging's channels reordered
    for ``nn.Unfold``; ``attn_mask`` buffers and the head dropped. The final norm becomes the last stage's
    output norm ``norm{S-1}``; the other stages' output norms ``norm{s}`` are written as mmseg initialises them."""
    out = {}
    for key, value in official.items():
        if key.startswith("head.") or key.endswith(".attn_mask"):
            continue
        if key.startswith("norm."):
            out[f"norm{len(encoder.depths) - 1}." + key.removeprefix("norm.")] = value
            continue
        key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        if key.startswith("layers."):
            key = "stages." + key.removeprefix("layers.")
            key = key.replace(".attn.", ".attn.w_msa.")
            key = key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
            if ".downsample." in key:
                value = _unfold_order(value)
        out[key] = value
    for s, stage in enumerate(encoder.stages[:-1]):
        out[f"norm{s}.weight"] = np.ones(stage.width, np.float32)
        out[f"norm{s}.bias"] = np.zeros(stage.width, np.float32)
    return out


# --- transformers: save_pretrained folders -------------------------------------------------------------------


def _split_qkv(release: dict, src: str, dst: str, names=("query", "key", "value")) -> dict[str, np.ndarray]:
    """``{src}.qkv.weight [3D, D]`` (and ``.bias``) -> ``{dst}.{query,key,value}.{weight,bias}``."""
    out = {}
    for kind in ("weight", "bias"):
        if f"{src}.qkv.{kind}" in release:
            for name, part in zip(names, np.split(release[f"{src}.qkv.{kind}"], 3), strict=True):
                out[f"{dst}.{name}.{kind}"] = part
    return out


def _hf_block(release: dict, src: str, dst: str, attention: str, output: str) -> dict[str, np.ndarray]:
    """A timm block's keys under ``src`` -> transformers' ViT / BEiT / Swin layer under ``dst``."""
    out = _split_qkv(release, f"{src}.attn", f"{dst}.{attention}")
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": output,
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for ours, theirs in renames.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{theirs}.{kind}"] = release[f"{src}.{ours}.{kind}"]
    return out


def _labels(num_classes: int) -> dict:
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(num_classes)},
    }


def _image_size(size: tuple[int, int]):
    return int(size[0]) if size[0] == size[1] else [int(s) for s in size]


def _vit_config(encoder, channels: int) -> dict:
    """The config keys transformers' ViT and BEiT share, for a ViT ``encoder`` of ``channels`` input channels."""
    return {
        "image_size": _image_size(encoder.image_size),
        "patch_size": encoder.patch_size,
        "num_channels": channels,
        "hidden_size": encoder.width,
        "num_hidden_layers": encoder.depth,
        "num_attention_heads": encoder.num_heads,
        "intermediate_size": encoder.mlp_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": VIT_LAYER_NORM_EPS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def transformers_vit(encoder: vit.Encoder, params: dict, head: dict | None = None) -> Export:
    """``ViTModel`` (or, with a ``pool='cls'`` head, ``ViTForImageClassification``) weights and config."""
    release = vit_state_dict(encoder, params, head)
    if "norm.weight" not in release:
        raise ExportError("transformers' ViTModel always applies a final norm; this encoder has none (pool='avg').")
    sd = {
        "embeddings.cls_token": release["cls_token"],
        "embeddings.position_embeddings": release["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": release["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": release["patch_embed.proj.bias"],
        "layernorm.weight": release["norm.weight"],
        "layernorm.bias": release["norm.bias"],
    }
    for i in range(encoder.depth):
        sd |= _hf_block(release, f"blocks.{i}", f"encoder.layer.{i}", "attention.attention", "attention.output.dense")
    config = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        **_vit_config(encoder, release["patch_embed.proj.weight"].shape[1]),
        "qkv_bias": True,
    }
    if head is not None:
        sd = {f"vit.{k}": v for k, v in sd.items()} | {
            "classifier.weight": release["head.weight"],
            "classifier.bias": release["head.bias"],
        }
        config |= {"architectures": ["ViTForImageClassification"]} | _labels(release["head.weight"].shape[0])
    return Export(sd, None, config["architectures"][0], config)


def transformers_beit(encoder: simmim.SimMIMEncoder, params: dict, head: dict | None = None) -> Export:
    """``BeitModel`` weights and config: per-layer relative tables, layer scale as ``lambda_{1,2}``."""
    del head  # SimMIM leaves no classifier
    release = hf_simmim.encoder_to_official(encoder, params)
    sd = {
        "embeddings.cls_token": release["cls_token"],
        "embeddings.patch_embeddings.projection.weight": release["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": release["patch_embed.proj.bias"],
        "layernorm.weight": release["norm.weight"],
        "layernorm.bias": release["norm.bias"],
    }
    if "pos_embed" in release:
        sd["embeddings.position_embeddings"] = release["pos_embed"]
    for i in range(encoder.depth):
        src, dst = f"blocks.{i}", f"encoder.layer.{i}"
        block = release | {f"{src}.attn.qkv.bias": np.zeros(3 * encoder.width, np.float32)}  # split, then dropped
        layer = _hf_block(block, src, dst, "attention.attention", "attention.output.dense")
        del layer[f"{dst}.attention.attention.key.bias"]
        layer[f"{dst}.attention.attention.query.bias"] = release[f"{src}.attn.q_bias"]
        layer[f"{dst}.attention.attention.value.bias"] = release[f"{src}.attn.v_bias"]
        if f"{src}.gamma_1" in release:
            layer[f"{dst}.lambda_1"], layer[f"{dst}.lambda_2"] = release[f"{src}.gamma_1"], release[f"{src}.gamma_2"]
        table = release.get(f"{src}.attn.relative_position_bias_table")
        if table is not None:
            layer[f"{dst}.attention.attention.relative_position_bias.relative_position_bias_table"] = table
        sd |= layer
    config = {
        "model_type": "beit",
        "architectures": ["BeitModel"],
        **_vit_config(encoder, release["patch_embed.proj.weight"].shape[1]),
        "use_mask_token": False,
        "use_absolute_position_embeddings": "pos_embed" in release,
        "use_relative_position_bias": "relative_position_bias" in params,
        "use_shared_relative_position_bias": False,
        # transformers adds lambda_{1,2} only for a positive value; the weights overwrite it.
        "layer_scale_init_value": encoder.layer_scale_init or 0.0,
        "use_mean_pooling": False,  # a final LayerNorm on the tokens, as ours
        "drop_path_rate": 0.0,
    }
    return Export(sd, None, "BeitModel", config)


def transformers_swin(encoder: swin.SwinTransformer, params: dict, head: dict | None = None) -> Export:
    """``SwinModel`` (with a head, ``SwinForImageClassification``) weights and config, from the official layout."""
    official = swin_state_dict(encoder, params, head)
    sd = {}
    for key, value in official.items():
        if key.endswith(swin_checkpoint.BUFFER_SUFFIXES) or ".blocks." in key:
            continue
        key = key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
        key = key.replace("patch_embed.norm.", "embeddings.norm.")
        key = re.sub(r"^layers\.", "encoder.layers.", key)
        key = re.sub(r"^norm\.", "layernorm.", key)
        sd[key] = value
    for s, stage in enumerate(encoder.stages):
        for j in range(stage.depth):
            src, dst = f"layers.{s}.blocks.{j}", f"encoder.layers.{s}.blocks.{j}"
            sd |= _hf_block(official, src, dst, "attention.self", "attention.output.dense")
            sd[f"{dst}.attention.self.relative_position_bias_table"] = official[
                f"{src}.attn.relative_position_bias_table"
            ]
    config = {
        "model_type": "swin",
        "architectures": ["SwinModel"],
        "image_size": _image_size(encoder.image_size),
        "patch_size": encoder.patch_size,
        "num_channels": encoder.channels,
        "embed_dim": encoder.width,
        "depths": list(encoder.depths),
        "num_heads": list(encoder.num_heads),
        "window_size": encoder.window_size,
        "mlp_ratio": encoder.mlp_ratio,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "layer_norm_eps": SWIN_LAYER_NORM_EPS,
        "use_absolute_embeddings": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if "head.weight" in official:
        sd = {f"swin.{k}": v for k, v in sd.items() if not k.startswith("head.")}
        sd |= {"classifier.weight": official["head.weight"], "classifier.bias": official["head.bias"]}
        config |= {"architectures": ["SwinForImageClassification"]} | _labels(official["head.weight"].shape[0])
    return Export(sd, None, config["architectures"][0], config)


_TRANSFORMERS = {"vit": transformers_vit, "simmim_vit": transformers_beit, "swin": transformers_swin}


# --- files ---------------------------------------------------------------------------------------------------


def check_output(fmt: str, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises ``ExportError`` naming the fix when ``out`` does not suit ``fmt`` or already exists."""
    out = os.fspath(out)
    if fmt == "transformers":
        if out.endswith(WEIGHT_SUFFIXES):
            raise ExportError(
                f"--to transformers writes a folder (config.json + model.safetensors); --out {out} "
                "names a file: give a folder path."
            )
    elif not out.endswith(MM_SUFFIXES if fmt in ("mmseg", "mmdet") else WEIGHT_SUFFIXES):
        allowed = MM_SUFFIXES if fmt in ("mmseg", "mmdet") else WEIGHT_SUFFIXES
        raise ExportError(f"--out {out}: --to {fmt} writes a file ending in one of {allowed}.")
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")


def write(export: Export, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes ``export`` to ``out`` (a file, or transformers' folder), beside it first and then renamed into
    place, so ``out`` is never truncated; an existing ``out`` is refused unless ``overwrite``."""
    out = os.fspath(out)
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    if export.config is None:
        weight_files.write(export.state_dict, out, key=export.wrapper)
        return
    partial = f"{out}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    weight_files.write(export.state_dict, os.path.join(partial, "model.safetensors"))
    with open(os.path.join(partial, "config.json"), "w") as file:
        json.dump(export.config, file, indent=2, sort_keys=True)
    if os.path.lexists(out):
        replaced = f"{out}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(partial, out)
        shutil.rmtree(replaced) if os.path.isdir(replaced) else os.remove(replaced)
    else:
        os.replace(partial, out)
