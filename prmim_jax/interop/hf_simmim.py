"""SimMIM checkpoints -> our ``SimMIM`` parameters: microsoft/SimMIM's ViT layout, and transformers' renaming of it.

The official layout (``models/simmim.py`` and ``models/vision_transformer.py``
of microsoft/SimMIM; a ViT of width ``D``, depth ``L``, ``heads`` heads, patch
``p``, ``C`` channels, ``N`` tokens on an ``H x W`` grid; weights ``[out, in]``
as PyTorch stores them):

==============================================  ===========================  =============================
key                                             shape                        our parameter
==============================================  ===========================  =============================
``encoder.cls_token``, ``encoder.mask_token``   ``[1, 1, D]``                ``encoder/cls_token``, ``mask_token``
``encoder.pos_embed`` (``USE_APE`` only)        ``[1, 1 + N, D]``            ``encoder/pos_embedding``
``encoder.patch_embed.proj.{weight,bias}``      ``[D, C, p, p]``, ``[D]``    ``encoder/patch_embed``
``encoder.rel_pos_bias.relative_position_``     ``[(2H-1)(2W-1)+3, heads]``  ``encoder/relative_position_bias``
``bias_table`` (``USE_SHARED_RPB`` only)
``encoder.rel_pos_bias.relative_position_``     ``[1 + N, 1 + N]``           checked against ours
``index`` (a buffer, optional)
``encoder.blocks.{i}.gamma_{1,2}`` (layer       ``[D]``                      ``.../block_{i}/layer_scale_``
scale only)                                                                  ``{attn,mlp}``
``encoder.blocks.{i}.norm1.{weight,bias}``      ``[D]``                      ``.../norm1``
``encoder.blocks.{i}.attn.qkv.weight``          ``[3D, D]`` = ``[q; k; v]``  ``attn/{query,key,value}``
``encoder.blocks.{i}.attn.{q,v}_bias``          ``[D]``                      ``attn/{query,value}/bias``
                                                                             (key bias: zero)
``encoder.blocks.{i}.attn.proj.{weight,bias}``  ``[D, D]``, ``[D]``          ``attn/out``
``encoder.blocks.{i}.norm2.*``, ``mlp.fc1.*``,  as MAE's                     ``.../norm2``, ``mlp/fc1``,
``mlp.fc2.*``                                                                ``mlp/fc2``
``encoder.norm.{weight,bias}``                  ``[D]``                      ``encoder/transformer/norm``
``decoder.0.{weight,bias}``                     ``[C p p, D, 1, 1]``,        ``head`` (rows permuted from
                                                ``[C p p]``                  ``(c, i, j)`` to ``(i, j, c)``)
==============================================  ===========================  =============================

The official ViT has no key bias; ours has one, set to zero (it cannot change
the attention: it adds one value to all logits of a query). transformers'
``ViTForMaskedImageModeling`` holds the same model under other names, with
separate q, k, v projections and a learned position table; ``from_transformers``
renames it into the official layout (dropping the key bias, which for the same
reason changes nothing) and reads that.
"""

from __future__ import annotations

import os

import numpy as np

from prmim_jax.interop import weight_files
from prmim_jax.interop.mae_checkpoint import CheckpointMismatchError
from prmim_jax.models import relative_position
from prmim_jax.models import simmim as simmim_lib


def expected_shapes(model: simmim_lib.SimMIM) -> dict[str, tuple[int, ...]]:
    """Every key of an official SimMIM checkpoint of ``model``'s architecture, with its shape."""
    d, n, heads = model.width, model.grid[0] * model.grid[1], model.num_heads
    shapes = {"encoder.cls_token": (1, 1, d), "encoder.mask_token": (1, 1, d)}
    if model.position_embedding == "learned":
        shapes["encoder.pos_embed"] = (1, 1 + n, d)
    shapes |= {
        "encoder.patch_embed.proj.weight": (d, model.channels, model.patch_size, model.patch_size),
        "encoder.patch_embed.proj.bias": (d,),
    }
    if model.relative_position_bias == "shared":
        shapes["encoder.rel_pos_bias.relative_position_bias_table"] = (
            relative_position.relative_position_bias_size(model.grid),
            heads,
        )
    for i in range(model.depth):
        prefix = f"encoder.blocks.{i}"
        if model.layer_scale_init is not None:
            shapes |= {f"{prefix}.gamma_1": (d,), f"{prefix}.gamma_2": (d,)}
        shapes |= {
            f"{prefix}.norm1.weight": (d,),
            f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.q_bias": (d,),
            f"{prefix}.attn.v_bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.proj.weight": (d, d),
            f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,),
            f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (model.mlp_dim, d),
            f"{prefix}.mlp.fc1.bias": (model.mlp_dim,),
            f"{prefix}.mlp.fc2.weight": (d, model.mlp_dim),
            f"{prefix}.mlp.fc2.bias": (d,),
        }
    return shapes | {
        "encoder.norm.weight": (d,),
        "encoder.norm.bias": (d,),
        "decoder.0.weight": (model.patch_dim, d, 1, 1),
        "decoder.0.bias": (model.patch_dim,),
    }


def _head_rows_from_official(rows: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """Conv output channels ``(c, i, j)`` (PixelShuffle's order) -> ``patchify``'s ``(i, j, c)``, first axis."""
    rest = rows.shape[1:]
    return rows.reshape(channels, patch_size, patch_size, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest)))


def _block_from_official(sd: dict, prefix: str, model: simmim_lib.SimMIM) -> dict:
    d, heads = model.width, model.num_heads
    head_dim = d // heads
    qkv = sd[f"{prefix}.attn.qkv.weight"]
    biases = {
        "query": sd[f"{prefix}.attn.q_bias"],
        "key": np.zeros(d, np.float32),
        "value": sd[f"{prefix}.attn.v_bias"],
    }
    attn = {
        name: {
            "kernel": qkv[i * d : (i + 1) * d].T.reshape(d, heads, head_dim),
            "bias": biases[name].reshape(heads, head_dim),
        }
        for i, name in enumerate(("query", "key", "value"))
    }
    attn["out"] = {
        "kernel": sd[f"{prefix}.attn.proj.weight"].T.reshape(heads, head_dim, d),
        "bias": sd[f"{prefix}.attn.proj.bias"],
    }
    block = {
        "norm1": {"scale": sd[f"{prefix}.norm1.weight"], "bias": sd[f"{prefix}.norm1.bias"]},
        "attn": attn,
        "norm2": {"scale": sd[f"{prefix}.norm2.weight"], "bias": sd[f"{prefix}.norm2.bias"]},
        "mlp": {
            fc: {"kernel": sd[f"{prefix}.mlp.{fc}.weight"].T, "bias": sd[f"{prefix}.mlp.{fc}.bias"]}
            for fc in ("fc1", "fc2")
        },
    }
    if model.layer_scale_init is not None:
        block["layer_scale_attn"] = sd[f"{prefix}.gamma_1"]
        block["layer_scale_mlp"] = sd[f"{prefix}.gamma_2"]
    return block


def from_official(state_dict: dict[str, np.ndarray], model: simmim_lib.SimMIM) -> dict:
    """An official SimMIM ViT state dict -> our parameters ``{'encoder', 'head'}`` (float32 numpy).

    Raises ``CheckpointMismatchError`` naming the first missing or unexpected
    key, a key whose shape differs, or a stored relative position index that
    is not ours (the model's layer scale, position embedding and relative bias
    settings decide which keys are expected). An aggregator is not part of
    SimMIM's checkpoints: merge these into initialised parameters.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    index_key = "encoder.rel_pos_bias.relative_position_index"
    stored_index = sd.pop(index_key, None)
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    expected = expected_shapes(model)
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:5]}); is this a "
            "SimMIM ViT pretraining checkpoint, and do layer_scale_init, position_embedding and "
            "relative_position_bias match its USE_APE / USE_SHARED_RPB / INIT_VALUES?"
        )
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointMismatchError(f"missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:5]}).")
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise CheckpointMismatchError(f"key {key!r} has shape {sd[key].shape}; the model expects {shape}.")
    if stored_index is not None and not np.array_equal(
        stored_index, relative_position.relative_position_index(model.grid)
    ):
        raise CheckpointMismatchError(
            f"key {index_key!r} is not BEiT's relative position index of a {model.grid} grid."
        )

    weight = sd["encoder.patch_embed.proj.weight"]
    encoder = {
        "cls_token": sd["encoder.cls_token"],
        "mask_token": sd["encoder.mask_token"],
        # [D, C, p, q] -> [p * q * C, D] in patchify's (p, q, c) order
        "patch_embed": {
            "kernel": weight.transpose(2, 3, 1, 0).reshape(-1, model.width),
            "bias": sd["encoder.patch_embed.proj.bias"],
        },
        "transformer": {
            f"block_{i}": _block_from_official(sd, f"encoder.blocks.{i}", model) for i in range(model.depth)
        }
        | {"norm": {"scale": sd["encoder.norm.weight"], "bias": sd["encoder.norm.bias"]}},
    }
    if model.position_embedding == "learned":
        encoder["pos_embedding"] = sd["encoder.pos_embed"][0]
    if model.relative_position_bias == "shared":
        encoder["relative_position_bias"] = sd["encoder.rel_pos_bias.relative_position_bias_table"]
    rows = _head_rows_from_official(sd["decoder.0.weight"][:, :, 0, 0], model.patch_size, model.channels)
    head = {
        "kernel": rows.reshape(model.patch_dim, model.width).T,
        "bias": _head_rows_from_official(sd["decoder.0.bias"], model.patch_size, model.channels).reshape(-1),
    }
    return {"encoder": encoder, "head": head}


def official_from_transformers(state_dict) -> dict[str, np.ndarray]:
    """transformers' ``ViTForMaskedImageModeling`` state dict -> official SimMIM names (fused ``qkv = [q; k; v]``).

    The key projection's bias is dropped (the official ViT has none; it changes
    no attention weight). Accepts torch tensors or numpy arrays.
    """
    # Copies: a torch state dict shares memory with the live model, which its owner may go on changing.
    sd = {k: np.array(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    out = {
        "encoder.cls_token": sd.pop("vit.embeddings.cls_token"),
        "encoder.mask_token": sd.pop("vit.embeddings.mask_token"),
        "encoder.pos_embed": sd.pop("vit.embeddings.position_embeddings"),
        "encoder.patch_embed.proj.weight": sd.pop("vit.embeddings.patch_embeddings.projection.weight"),
        "encoder.patch_embed.proj.bias": sd.pop("vit.embeddings.patch_embeddings.projection.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("vit.layers.")})
    for i in layers:
        src, dst = f"vit.layers.{i}.", f"encoder.blocks.{i}."
        out[f"{dst}attn.qkv.weight"] = np.concatenate([sd.pop(f"{src}attention.{p}_proj.weight") for p in "qkv"])
        out[f"{dst}attn.q_bias"] = sd.pop(f"{src}attention.q_proj.bias")
        out[f"{dst}attn.v_bias"] = sd.pop(f"{src}attention.v_proj.bias")
        sd.pop(f"{src}attention.k_proj.bias")
        for hf_name, name in (
            ("attention.o_proj", "attn.proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{dst}{name}.{kind}"] = sd.pop(f"{src}{hf_name}.{kind}")
    for kind in ("weight", "bias"):
        out[f"encoder.norm.{kind}"] = sd.pop(f"vit.layernorm.{kind}")
        out[f"decoder.0.{kind}"] = sd.pop(f"decoder.0.{kind}")
    if sd:
        raise CheckpointMismatchError(f"unexpected transformers keys {sorted(sd)[:5]} ({len(sd)} in all).")
    return out


def from_transformers(state_dict, model: simmim_lib.SimMIM) -> dict:
    """transformers' ``ViTForMaskedImageModeling`` weights -> our parameters (``position_embedding='learned'``)."""
    return from_official(official_from_transformers(state_dict), model)


def load(path: str | os.PathLike, model: simmim_lib.SimMIM) -> dict:
    """Reads an official SimMIM checkpoint (``{'model': state_dict}`` ``.pth`` or ``.safetensors``); no PyTorch needed."""
    return from_official(weight_files.read(path), model)
