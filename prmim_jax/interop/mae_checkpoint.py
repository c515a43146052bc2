"""Official MAE (facebookresearch/mae, timm names) checkpoints <-> our parameters.

The official layout, for an encoder of width ``D``, depth ``L``, patch ``p``,
``C`` channels, ``N`` tokens, and a decoder of width ``Dd`` and depth ``Ld``
(all weights ``[out, in]`` as PyTorch stores them, float32):

====================================  =========================  ===========================
key                                   shape                      our parameter
====================================  =========================  ===========================
``cls_token``                         ``[1, 1, D]``              ``encoder/cls_token``
``pos_embed``                         ``[1, 1 + N, D]``          fixed 2-D sin-cos (checked)
``patch_embed.proj.weight``           ``[D, C, p, p]``           ``encoder/patch_embed/kernel``
``patch_embed.proj.bias``             ``[D]``
``blocks.{i}.norm1.{weight,bias}``    ``[D]``                    ``.../block_{i}/norm1``
``blocks.{i}.attn.qkv.weight``        ``[3D, D]`` = ``[q; k; v]``  ``attn/{query,key,value}``
``blocks.{i}.attn.qkv.bias``          ``[3D]``
``blocks.{i}.attn.proj.{weight,bias}``  ``[D, D]``, ``[D]``       ``attn/out``
``blocks.{i}.norm2.{weight,bias}``    ``[D]``                    ``.../norm2``
``blocks.{i}.mlp.fc1.{weight,bias}``  ``[4D, D]``, ``[4D]``      ``mlp/fc1``
``blocks.{i}.mlp.fc2.{weight,bias}``  ``[D, 4D]``, ``[D]``       ``mlp/fc2``
``norm.{weight,bias}``                ``[D]``                    ``encoder/transformer/norm``
``mask_token``                        ``[1, 1, Dd]``             ``decoder/mask_token``
``decoder_pos_embed``                 ``[1, 1 + N, Dd]``         fixed 2-D sin-cos (checked)
``decoder_embed.{weight,bias}``       ``[Dd, D]``, ``[Dd]``      ``decoder/embed``
``decoder_blocks.{i}.*``              as ``blocks.{i}.*``        ``decoder/transformer/...``
``decoder_norm.{weight,bias}``        ``[Dd]``                   ``decoder/transformer/norm``
``decoder_pred.{weight,bias}``        ``[p*p*C, Dd]``            ``pred``
====================================  =========================  ===========================

Encoder-only checkpoints (the released ``mae_pretrain_vit_*.pth``) hold the
first group only. Conversion is exact in both directions (transposes and
reshapes, no arithmetic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from prmim_jax.interop import weight_files
from prmim_jax.models import mae as mae_lib
from prmim_jax.models import vit

# Sin-cos tables are recomputed by the model; a stored table must match ours this closely.
_POS_EMBED_ATOL = 1e-5


def _check_aggregator(model: mae_lib.MaskedAutoencoder) -> None:
    if model.aggregation_kernel and model.aggregator != "dwconv":
        raise CheckpointMismatchError(
            f"aggregator {model.aggregator!r} has no PyTorch layout here; only the paper's depth-wise "
            "aggregation ('dwconv') reads and writes as decoder_aggregation.{weight,bias}."
        )


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model; the message names the key."""


def check_keys(state_dict, expected: dict[str, tuple[int, ...]], hint: str = "") -> None:
    """``CheckpointMismatchError`` naming the first key of ``state_dict`` (arrays, or ``weight_files.read(...,
    data=False)``'s stand-ins) that ``expected`` lacks, then the first it misses, then the first whose shape
    differs; ``hint`` (what the file holds, the fix) ends each message."""
    hint = f"; {hint}" if hint else ""
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:5]}){hint}"
        )
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:5]}){hint}"
        )
    for key, shape in expected.items():
        if np.shape(state_dict[key]) != tuple(shape):
            raise CheckpointMismatchError(f"key {key!r} has shape {np.shape(state_dict[key])}; expected {shape}{hint}")


# The torch-layout helpers below are shared by the other importers (``swin_checkpoint``).


def linear_to_torch(p):
    """``{kernel [in, out], bias}`` -> ``{weight [out, in], bias}`` (``nn.Linear``)."""
    return {"weight": p["kernel"].T, "bias": p["bias"]}


def linear_from_torch(sd, prefix):
    """``sd[prefix.weight] [out, in]``, ``sd[prefix.bias]`` -> ``{kernel [in, out], bias}``."""
    return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}


def norm_to_torch(p):
    """LayerNorm ``{scale, bias}`` -> ``{weight, bias}``."""
    return {"weight": p["scale"], "bias": p["bias"]}


def norm_from_torch(sd, prefix):
    """``sd[prefix.weight]``, ``sd[prefix.bias]`` -> LayerNorm ``{scale, bias}``."""
    return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}


def block_to_torch(block, prefix, out):
    """Writes a pre-norm block (``norm1``, ``attn`` q/k/v/out, ``norm2``, ``mlp``) into ``out`` as timm's
    ``{prefix}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2`` (fused ``qkv = [q; k; v]``)."""
    attn = block["attn"]
    width = attn["out"]["bias"].shape[0]
    qkv = [attn[n]["kernel"].reshape(width, width).T for n in ("query", "key", "value")]
    out[f"{prefix}.norm1.weight"], out[f"{prefix}.norm1.bias"] = norm_to_torch(block["norm1"]).values()
    out[f"{prefix}.attn.qkv.weight"] = np.concatenate(qkv, axis=0)
    out[f"{prefix}.attn.qkv.bias"] = np.concatenate([attn[n]["bias"].reshape(width) for n in ("query", "key", "value")])
    out[f"{prefix}.attn.proj.weight"] = attn["out"]["kernel"].reshape(width, width).T
    out[f"{prefix}.attn.proj.bias"] = attn["out"]["bias"]
    out[f"{prefix}.norm2.weight"], out[f"{prefix}.norm2.bias"] = norm_to_torch(block["norm2"]).values()
    for fc in ("fc1", "fc2"):
        out[f"{prefix}.mlp.{fc}.weight"], out[f"{prefix}.mlp.{fc}.bias"] = linear_to_torch(block["mlp"][fc]).values()


def block_from_torch(sd, prefix, num_heads):
    """The inverse of ``block_to_torch``: our block parameters from the keys under ``prefix``."""
    qkv_w, qkv_b = sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"]
    width = qkv_w.shape[1]
    head_dim = width // num_heads
    attn = {}
    for i, name in enumerate(("query", "key", "value")):
        rows = slice(i * width, (i + 1) * width)
        attn[name] = {
            "kernel": qkv_w[rows].T.reshape(width, num_heads, head_dim),
            "bias": qkv_b[rows].reshape(num_heads, head_dim),
        }
    attn["out"] = {
        "kernel": sd[f"{prefix}.attn.proj.weight"].T.reshape(num_heads, head_dim, width),
        "bias": sd[f"{prefix}.attn.proj.bias"],
    }
    return {
        "norm1": norm_from_torch(sd, f"{prefix}.norm1"),
        "attn": attn,
        "norm2": norm_from_torch(sd, f"{prefix}.norm2"),
        "mlp": {fc: linear_from_torch(sd, f"{prefix}.mlp.{fc}") for fc in ("fc1", "fc2")},
    }


def block_shapes(prefix: str, width: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
    """The keys ``block_to_torch`` writes for a block of ``width`` and MLP width ``mlp_dim``, with their shapes."""
    return {
        f"{prefix}.norm1.weight": (width,),
        f"{prefix}.norm1.bias": (width,),
        f"{prefix}.attn.qkv.weight": (3 * width, width),
        f"{prefix}.attn.qkv.bias": (3 * width,),
        f"{prefix}.attn.proj.weight": (width, width),
        f"{prefix}.attn.proj.bias": (width,),
        f"{prefix}.norm2.weight": (width,),
        f"{prefix}.norm2.bias": (width,),
        f"{prefix}.mlp.fc1.weight": (mlp_dim, width),
        f"{prefix}.mlp.fc1.bias": (mlp_dim,),
        f"{prefix}.mlp.fc2.weight": (width, mlp_dim),
        f"{prefix}.mlp.fc2.bias": (width,),
    }


def patch_kernel_to_torch(kernel, patch_size, channels):
    """Our patch kernel ``[p * q * C, D]`` (patchify's ``(p, q, c)`` order) -> ``Conv2d``'s ``[D, C, p, q]``."""
    width = kernel.shape[-1]
    return kernel.reshape(patch_size, patch_size, channels, width).transpose(3, 2, 0, 1)


def patch_kernel_from_torch(weight):
    """A ``Conv2d`` patch embedding weight ``[D, C, p, q]`` -> our kernel ``[p * q * C, D]``."""
    width, channels, p, q = weight.shape
    return weight.transpose(2, 3, 1, 0).reshape(p * q * channels, width)


def encoder_to_torch(encoder: dict, pos_embed: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
    """A ViT encoder's numpy parameters (``cls_token``, ``patch_embed``, ``transformer/block_{i}``, and
    ``transformer/norm`` when it has a final norm) -> the table's encoder keys, in official order.

    ``pos_embed [1 + N, D]`` is written as ``pos_embed [1, 1 + N, D]`` (the caller's table: the fixed sin-cos
    one, or a learned one); a ``pos_embedding`` in ``encoder`` is not read.
    """
    kernel = encoder["patch_embed"]["kernel"]
    out = {
        "cls_token": encoder["cls_token"],
        "pos_embed": np.asarray(pos_embed)[None],
        "patch_embed.proj.weight": patch_kernel_to_torch(kernel, patch_size, kernel.shape[0] // patch_size**2),
        "patch_embed.proj.bias": encoder["patch_embed"]["bias"],
    }
    transformer = encoder["transformer"]
    for i in range(sum(name.startswith("block_") for name in transformer)):
        block_to_torch(transformer[f"block_{i}"], f"blocks.{i}", out)
    if "norm" in transformer:
        out["norm.weight"], out["norm.bias"] = norm_to_torch(transformer["norm"]).values()
    return out


def to_state_dict(
    params: dict, model: mae_lib.MaskedAutoencoder, include_decoder: bool = True
) -> dict[str, np.ndarray]:
    """Our (unboxed) parameters -> the official MAE state dict, float32 numpy, official key order."""
    params = to_numpy(params)
    out = encoder_to_torch(params["encoder"], vit.sincos_2d(model.width, model.grid), model.patch_size)
    if include_decoder:
        dec = params["decoder"]
        out["mask_token"] = dec["mask_token"]
        out["decoder_pos_embed"] = vit.sincos_2d(model.decoder_width, model.grid)[None]
        out["decoder_embed.weight"], out["decoder_embed.bias"] = linear_to_torch(dec["embed"]).values()
        for i in range(model.decoder_depth):
            block_to_torch(dec["transformer"][f"block_{i}"], f"decoder_blocks.{i}", out)
        out["decoder_norm.weight"], out["decoder_norm.bias"] = norm_to_torch(params["decoder_norm"]).values()
        out["decoder_pred.weight"], out["decoder_pred.bias"] = linear_to_torch(params["pred"]).values()
        _check_aggregator(model)
        if model.aggregation_kernel:
            out["decoder_aggregation.weight"] = params["aggregation"]["kernel"].transpose(2, 0, 1)[:, None]
            out["decoder_aggregation.bias"] = params["aggregation"]["bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_state_dict(state_dict: dict[str, np.ndarray], model: mae_lib.MaskedAutoencoder) -> dict:
    """An official MAE state dict -> our parameters (float32 numpy).

    Accepts exactly the encoder-only or the full key set of ``model``'s
    geometry; returns ``{'encoder': ...}`` or ``{'encoder', 'decoder', 'pred'}``
    accordingly. Raises ``CheckpointMismatchError`` naming the first missing
    or unexpected key, or a key whose shape differs, or a position table that
    is not the fixed sin-cos table of the model's grid.
    """
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    full = expected_shapes(model, include_decoder=True)
    encoder_only = expected_shapes(model, include_decoder=False)
    has_decoder = any(k not in encoder_only for k in sd)
    expected = full if has_decoder else encoder_only
    check_keys(sd, expected, "is this an official MAE pretraining checkpoint of this architecture?")
    for key, width in (("pos_embed", model.width), ("decoder_pos_embed", model.decoder_width)):
        if key in sd and not np.allclose(sd[key][0], vit.sincos_2d(width, model.grid), atol=_POS_EMBED_ATOL):
            raise CheckpointMismatchError(f"key {key!r} is not the fixed 2-D sin-cos table of a {model.grid} grid.")

    params = {
        "encoder": {
            "cls_token": sd["cls_token"],
            "patch_embed": {
                "kernel": patch_kernel_from_torch(sd["patch_embed.proj.weight"]),
                "bias": sd["patch_embed.proj.bias"],
            },
            "transformer": {
                f"block_{i}": block_from_torch(sd, f"blocks.{i}", model.num_heads) for i in range(model.depth)
            }
            | {"norm": norm_from_torch(sd, "norm")},
        }
    }
    if has_decoder:
        params["decoder"] = {
            "mask_token": sd["mask_token"],
            "embed": linear_from_torch(sd, "decoder_embed"),
            "transformer": {
                f"block_{i}": block_from_torch(sd, f"decoder_blocks.{i}", model.decoder_num_heads)
                for i in range(model.decoder_depth)
            },
        }
        params["decoder_norm"] = norm_from_torch(sd, "decoder_norm")
        params["pred"] = linear_from_torch(sd, "decoder_pred")
        _check_aggregator(model)
        if model.aggregation_kernel:
            params["aggregation"] = {
                "kernel": sd["decoder_aggregation.weight"][:, 0].transpose(1, 2, 0),
                "bias": sd["decoder_aggregation.bias"],
            }
    return params


def expected_shapes(model: mae_lib.MaskedAutoencoder, include_decoder: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint of ``model``'s architecture, with its shape, in official order."""
    d, dd, n = model.width, model.decoder_width, model.grid[0] * model.grid[1]

    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + n, d),
        "patch_embed.proj.weight": (d, model.channels, model.patch_size, model.patch_size),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(model.depth):
        shapes |= block_shapes(f"blocks.{i}", d, model.mlp_dim)
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    if include_decoder:
        shapes |= {
            "mask_token": (1, 1, dd),
            "decoder_pos_embed": (1, 1 + n, dd),
            "decoder_embed.weight": (dd, d),
            "decoder_embed.bias": (dd,),
        }
        for i in range(model.decoder_depth):
            shapes |= block_shapes(f"decoder_blocks.{i}", dd, model.decoder_mlp_dim)
        shapes |= {
            "decoder_norm.weight": (dd,),
            "decoder_norm.bias": (dd,),
            "decoder_pred.weight": (model.patch_dim, dd),
            "decoder_pred.bias": (model.patch_dim,),
        }
        if model.aggregation_kernel:
            k = model.aggregation_kernel
            shapes |= {"decoder_aggregation.weight": (dd, 1, k, k), "decoder_aggregation.bias": (dd,)}
    return shapes


def load(path: str | os.PathLike, model: mae_lib.MaskedAutoencoder) -> dict:
    """Reads an official MAE checkpoint (``.pth`` or ``.safetensors``) into our parameters; see ``from_state_dict``."""
    return from_state_dict(weight_files.read(path), model)


def save(params: dict, model: mae_lib.MaskedAutoencoder, path: str | os.PathLike, include_decoder: bool = True) -> None:
    """Writes our parameters with official names: ``.safetensors``, or ``torch.save({'model': ...})`` otherwise."""
    weight_files.write(to_state_dict(params, model, include_decoder), path)


def merge_into(params: dict, imported: dict) -> dict:
    """``params`` with the top-level subtrees present in ``imported`` replaced (e.g. an encoder-only import)."""
    return {k: imported.get(k, v) for k, v in params.items()}


def to_numpy(tree):
    """A (possibly boxed) parameter tree as nested dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(getattr(tree, "value", tree))
