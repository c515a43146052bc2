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
the attention: it adds one value to all logits of a query). Without the ``encoder.``
prefix and with the shared table copied into every block
(``blocks.{i}.attn.relative_position_bias_table``) the encoder rows are BEiT's layout,
what timm's ``Beit`` and SimMIM's fine-tuning read: ``encoder_shapes``,
``encoder_from_official`` and ``encoder_to_official`` read and write both (``export``
writes BEiT's, ``official`` reads either). transformers'
``ViTForMaskedImageModeling`` holds the same model under other names, with
separate q, k, v projections and a learned position table; ``from_transformers``
renames it into the official layout (dropping the key bias, which for the same
reason changes nothing) and reads that.
"""

from __future__ import annotations

import os

import numpy as np

from prmim_jax.interop import mae_checkpoint, weight_files
from prmim_jax.interop.mae_checkpoint import CheckpointMismatchError
from prmim_jax.models import relative_position, vit
from prmim_jax.models import simmim as simmim_lib

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"  # the official ViT's (and timm Beit's) shared table
BLOCK_TABLE = "attn.relative_position_bias_table"  # BEiT's per-block table (``blocks.{i}.`` before it)


def encoder_shapes(encoder, channels: int, prefix: str = "encoder.", per_block_tables: bool = False) -> dict:
    """The encoder rows of the table for a ``SimMIMEncoder``-shaped ``encoder`` of ``channels`` channels, keys
    under ``prefix`` (``''``: BEiT's layout, what timm's ``Beit`` reads), with their shapes; the relative table
    shared (``rel_pos_bias.*``) or, ``per_block_tables``, one copy in every block (BEiT's)."""
    d, n, heads = encoder.width, encoder.grid[0] * encoder.grid[1], encoder.num_heads
    shapes = {f"{prefix}cls_token": (1, 1, d)}
    if encoder.position_embedding == "learned":
        shapes[f"{prefix}pos_embed"] = (1, 1 + n, d)
    shapes |= {
        f"{prefix}patch_embed.proj.weight": (d, channels, encoder.patch_size, encoder.patch_size),
        f"{prefix}patch_embed.proj.bias": (d,),
    }
    table = (relative_position.relative_position_bias_size(encoder.grid), heads)
    shared = encoder.relative_position_bias == "shared"
    if shared and not per_block_tables:
        shapes[f"{prefix}{SHARED_TABLE}"] = table
    for i in range(encoder.depth):
        block = f"{prefix}blocks.{i}"
        if encoder.layer_scale_init is not None:
            shapes |= {f"{block}.gamma_1": (d,), f"{block}.gamma_2": (d,)}
        body = mae_checkpoint.block_shapes(block, d, encoder.mlp_dim)
        del body[f"{block}.attn.qkv.bias"]  # no key bias: q_bias and v_bias
        shapes |= body | {f"{block}.attn.q_bias": (d,), f"{block}.attn.v_bias": (d,)}
        if shared and per_block_tables:
            shapes[f"{block}.{BLOCK_TABLE}"] = table
    return shapes | {f"{prefix}norm.weight": (d,), f"{prefix}norm.bias": (d,)}


def expected_shapes(model: simmim_lib.SimMIM) -> dict[str, tuple[int, ...]]:
    """Every key of an official SimMIM checkpoint of ``model``'s architecture, with its shape."""
    return encoder_shapes(model, model.channels) | {
        "encoder.mask_token": (1, 1, model.width),
        "decoder.0.weight": (model.patch_dim, model.width, 1, 1),
        "decoder.0.bias": (model.patch_dim,),
    }


def _head_rows_from_official(rows: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """Conv output channels ``(c, i, j)`` (PixelShuffle's order) -> ``patchify``'s ``(i, j, c)``, first axis."""
    rest = rows.shape[1:]
    return rows.reshape(channels, patch_size, patch_size, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest)))


def encoder_from_official(state_dict: dict, encoder, prefix: str = "encoder.") -> dict:
    """The ``SimMIMEncoder`` parameters (float32 numpy, no mask token) from ``encoder_shapes``' keys under
    ``prefix`` (checked already); a per-block table (BEiT's layout) is read from block 0, the caller having
    checked the blocks' copies equal. The official ViT has no key bias: ours is zero."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if k.startswith(prefix)}
    for i in range(encoder.depth):  # mae_checkpoint's block reader takes the fused [q; k; v] bias
        block = f"{prefix}blocks.{i}"
        q_bias, v_bias = sd[f"{block}.attn.q_bias"], sd[f"{block}.attn.v_bias"]
        sd[f"{block}.attn.qkv.bias"] = np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])
    blocks = {}
    for i in range(encoder.depth):
        block = f"{prefix}blocks.{i}"
        blocks[f"block_{i}"] = mae_checkpoint.block_from_torch(sd, block, encoder.num_heads)
        if encoder.layer_scale_init is not None:
            blocks[f"block_{i}"] |= {
                "layer_scale_attn": sd[f"{block}.gamma_1"],
                "layer_scale_mlp": sd[f"{block}.gamma_2"],
            }
    params = {
        "cls_token": sd[f"{prefix}cls_token"],
        "patch_embed": {
            "kernel": mae_checkpoint.patch_kernel_from_torch(sd[f"{prefix}patch_embed.proj.weight"]),
            "bias": sd[f"{prefix}patch_embed.proj.bias"],
        },
        "transformer": blocks | {"norm": mae_checkpoint.norm_from_torch(sd, f"{prefix}norm")},
    }
    if encoder.position_embedding == "learned":
        params["pos_embedding"] = sd[f"{prefix}pos_embed"][0]
    if encoder.relative_position_bias == "shared":
        params["relative_position_bias"] = sd.get(f"{prefix}{SHARED_TABLE}", sd.get(f"{prefix}blocks.0.{BLOCK_TABLE}"))
    return params


def encoder_to_official(encoder, params: dict, prefix: str = "", per_block_tables: bool = True) -> dict:
    """A ``SimMIMEncoder``'s (numpy) parameters in ``encoder_shapes``' layout under ``prefix``, float32; by default
    BEiT's (timm's ``Beit``, what SimMIM's fine-tuning reads): the shared table copied into every block.

    ``blocks.{i}.attn.{q,v}_bias`` (no key bias: ours adds a constant to every logit of a query and is
    dropped), ``blocks.{i}.gamma_{1,2}`` with layer scale, ``pos_embed [1, 1 + N, D]`` with an absolute table
    (a sin-cos one written too), ``norm.*``.
    """
    table = _position_table(encoder, params)
    out = mae_checkpoint.encoder_to_torch(
        params, table if table is not None else np.zeros((1, encoder.width)), encoder.patch_size
    )
    if table is None:
        del out["pos_embed"]
    if "relative_position_bias" in params and not per_block_tables:
        out[SHARED_TABLE] = params["relative_position_bias"]
    transformer = params["transformer"]
    for i in range(encoder.depth):
        block, block_params = f"blocks.{i}", transformer[f"block_{i}"]
        q_bias, _, v_bias = np.split(out.pop(f"{block}.attn.qkv.bias"), 3)
        out[f"{block}.attn.q_bias"], out[f"{block}.attn.v_bias"] = q_bias, v_bias
        if "layer_scale_attn" in block_params:
            out[f"{block}.gamma_1"] = block_params["layer_scale_attn"]
            out[f"{block}.gamma_2"] = block_params["layer_scale_mlp"]
        if "relative_position_bias" in params and per_block_tables:
            out[f"{block}.{BLOCK_TABLE}"] = params["relative_position_bias"]
    return {prefix + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _position_table(encoder, params: dict) -> np.ndarray | None:
    """The absolute table ``[1 + N, D]`` a SimMIM encoder adds (learned or sin-cos), or None."""
    if encoder.position_embedding == "learned":
        return params["pos_embedding"]
    if encoder.position_embedding == "sincos":
        return vit.sincos_2d(encoder.width, encoder.grid)
    return None


def check_index(stored, grid: tuple[int, int], key: str) -> None:
    """``CheckpointMismatchError`` unless a stored ``relative_position_index`` buffer is BEiT's of ``grid``."""
    if not np.array_equal(stored, relative_position.relative_position_index(tuple(grid))):
        raise CheckpointMismatchError(f"key {key!r} is not BEiT's relative position index of a {grid} grid.")


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
    mae_checkpoint.check_keys(
        sd,
        expected_shapes(model),
        "is this a SimMIM ViT pretraining checkpoint, and do layer_scale_init, position_embedding and "
        "relative_position_bias match its USE_APE / USE_SHARED_RPB / INIT_VALUES?",
    )
    if stored_index is not None:
        check_index(stored_index, model.grid, index_key)
    encoder = encoder_from_official(sd, model) | {"mask_token": sd["encoder.mask_token"]}
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
