"""Our Swin computes what the official Swin computes, checked against an independent implementation: Hugging Face
transformers' ``SwinModel`` / ``SwinForImageClassification`` (PyTorch, CPU).

Random weights (LayerNorms and relative position tables included) are renamed from transformers' names to the
official Swin's (microsoft/Swin-Transformer's ``layers.{s}.blocks.{j}.attn.qkv``, ``layers.{s}.downsample`` after
stage ``s``, ``head``) and read by our importer, so the test also covers the importer and the official layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prmim_jax.interop import swin_checkpoint
from prmim_jax.models import swin

ATOL = 1e-5  # measured: 1.7e-6 (features), 5e-7 (pooled), 4e-7 (logits)
CLASSES = 5


@dataclasses.dataclass
class Arch:
    name: str
    image_size: tuple[int, int]
    window_size: int
    batch: int = 2


ARCHS = [
    Arch("56px_window7", (56, 56), 7),  # stage 0: 2x2 windows, shift 3; stage 1: 7x7 grid, one window
    Arch("64px_window4", (64, 64), 4, batch=3),  # both stages shifted
    Arch("32x64px_window4", (32, 64), 4),  # non-square: 8x16 grid, then 4x8 with the window clipped to 4
]


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def hf_model(arch: Arch, seed: int = 0) -> transformers.SwinForImageClassification:
    """A two-stage Swin (width 32, depths 2-2, heads 2-4, patch 4) with every parameter drawn at random."""
    config = transformers.SwinConfig(
        image_size=arch.image_size,
        patch_size=4,
        num_channels=3,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=arch.window_size,
        mlp_ratio=4.0,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        drop_path_rate=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    model = transformers.SwinForImageClassification(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            mean, std = random_weight_distribution(name, tuple(tensor.shape))
            tensor.copy_(torch.from_numpy((mean + std * rng.normal(size=tensor.shape)).astype(np.float32)))
    return model


def random_weight_distribution(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(mean, std)`` of a parameter: LayerNorms near 1 / 0, biases and relative position tables large enough to
    matter (0.5), weights ``1 / sqrt(fan_in)``."""
    if "norm" in name:
        return (1.0 if name.endswith("weight") else 0.0), 0.2
    if name.endswith("bias") or "relative_position_bias_table" in name:
        return 0.0, 0.5
    return 0.0, 1.0 / np.sqrt(np.prod(shape[1:]))


def hf_to_official(state_dict) -> dict[str, np.ndarray]:
    """transformers' Swin names -> the official Swin's (fused qkv = [q; k; v]; merging stays after its stage)."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    out = {}
    for key in [k for k in sd if ".attention.q_proj." in k]:
        block, kind = key.split(".attention.q_proj.")
        official = block.removeprefix("swin.encoder.")
        out[f"{official}.attn.qkv.{kind}"] = np.concatenate(
            [sd.pop(f"{block}.attention.{p}_proj.{kind}") for p in "qkv"]
        )
    renames = (
        ("swin.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
        ("swin.embeddings.norm.", "patch_embed.norm."),
        ("swin.encoder.", ""),
        (".attention.o_proj.", ".attn.proj."),
        (".attention.relative_position_bias.", ".attn."),
        (".layernorm_before.", ".norm1."),
        (".layernorm_after.", ".norm2."),
        ("swin.layernorm.", "norm."),
        ("classifier.", "head."),
    )
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def our_model(arch: Arch) -> swin.SwinTransformer:
    config = swin.model_config(
        "T",
        image_size=arch.image_size,
        window_size=arch.window_size,
        width=32,
        depths=(2, 2),
        num_heads=(2, 4),
        drop_path_rate=0.0,
    )
    return swin.build_swin(config, num_classes=CLASSES)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_swin_matches_transformers_swin(arch: Arch):
    reference = hf_model(arch)
    model = our_model(arch)
    params = swin_checkpoint.from_state_dict(hf_to_official(reference.state_dict()), model)

    images = np.random.default_rng(1).normal(size=(arch.batch, 3, *arch.image_size)).astype(np.float32)
    with torch.no_grad():
        expected_logits = reference(pixel_values=torch.from_numpy(images)).logits.numpy()
        expected = reference.swin(pixel_values=torch.from_numpy(images))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)))

    features = np.asarray(out.features)
    assert features.shape == (arch.batch, arch.image_size[0] // 8, arch.image_size[1] // 8, 64)
    errors = {
        "features": np.abs(features.reshape(arch.batch, -1, 64) - expected.last_hidden_state.numpy()).max(),
        "pooled": np.abs(np.asarray(out.pooled) - expected.pooler_output.numpy()).max(),
        "logits": np.abs(np.asarray(out.logits) - expected_logits).max(),
    }
    print(arch.name, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= ATOL, errors


def test_the_exported_index_and_mask_buffers_are_transformers_own():
    arch = ARCHS[1]
    reference, model = hf_model(arch), our_model(arch)
    buffers = swin_checkpoint.official_buffers(model)
    for s, stage in enumerate(reference.swin.encoder.layers):
        for j, layer in enumerate(stage.blocks):
            index = layer.attention.relative_position_bias.relative_position_index.numpy()
            np.testing.assert_array_equal(
                buffers[f"layers.{s}.blocks.{j}.attn.relative_position_index"].reshape(-1), index
            )
            grid = model.stages[s].grid
            mask = layer.get_attn_mask(*grid, dtype=torch.float32, device="cpu")
            ours = buffers.get(f"layers.{s}.blocks.{j}.attn_mask")
            assert (mask is None) == (ours is None)
            if mask is not None:
                np.testing.assert_array_equal(ours, mask.numpy())
