"""Our MAE computes what the official MAE computes, checked against an independent
implementation: Hugging Face transformers' ``ViTMAEForPreTraining`` (PyTorch, CPU).

Random weights (LayerNorm weights and biases, cls and mask tokens included) are
renamed from transformers' names to the official MAE's and read by our importer,
so the test also covers the importer and the official layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.vit_mae import modeling_vit_mae as hf_mae

from prmim_jax import masking
from prmim_jax.interop import mae_checkpoint
from prmim_jax.models import mae

LOSS_ATOL = 1e-5
OUTPUT_ATOL = 2e-5
MASK_RATIO = 0.75


@dataclasses.dataclass
class Arch:
    name: str
    image_size: int
    patch_size: int
    channels: int
    width: int
    depth: int
    heads: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    batch: int = 2


ARCHS = [
    Arch("rgb_32px_patch8", 32, 8, 3, 64, 2, 4, 32, 2, 4, batch=3),
    Arch("gray_28px_patch2", 28, 2, 1, 64, 2, 4, 32, 1, 4),
    Arch("vit_b16_224_reduced_depth", 224, 16, 3, 768, 2, 12, 512, 1, 16),
]


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def hf_model(arch: Arch, seed: int):
    config = transformers.ViTMAEConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=arch.channels,
        hidden_size=arch.width,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads,
        intermediate_size=4 * arch.width,
        decoder_hidden_size=arch.decoder_width,
        decoder_num_hidden_layers=arch.decoder_depth,
        decoder_num_attention_heads=arch.decoder_heads,
        decoder_intermediate_size=4 * arch.decoder_width,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        attn_implementation="eager",
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    generator = torch.Generator().manual_seed(seed)
    grid = arch.image_size // arch.patch_size
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "position_embeddings" in name or "pos_embed" in name:
                width = tensor.shape[-1]
                table = hf_mae.build_2d_sinusoidal_position_embedding(grid, grid, width, cls_token=True)
                # transformers stores MAE's [col | row] layout by swapping its [row | col] halves.
                tensor.copy_(torch.cat([table[:, width // 2 :], table[:, : width // 2]], dim=1)[None])
            elif "layernorm" in name or "norm" in name.split(".")[-2]:
                base = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias"):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
            elif "token" in name:
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = np.prod(tensor.shape[1:])
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / np.sqrt(fan_in))
    return model


def hf_to_official(state_dict) -> dict[str, np.ndarray]:
    """transformers' ViTMAE names -> the official MAE names (fused qkv = [q; k; v])."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    out = {
        "cls_token": sd.pop("vit.embeddings.cls_token"),
        "pos_embed": sd.pop("vit.embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("vit.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("vit.embeddings.patch_embeddings.projection.bias"),
        "mask_token": sd.pop("decoder.mask_token"),
        "decoder_pos_embed": sd.pop("decoder.decoder_pos_embed"),
    }
    renames = {
        "vit.layernorm.": "norm.",
        "decoder.decoder_embed.": "decoder_embed.",
        "decoder.decoder_norm.": "decoder_norm.",
        "decoder.decoder_pred.": "decoder_pred.",
    }
    for hf_prefix, official_prefix in (("vit.layers.", "blocks."), ("decoder.decoder_layers.", "decoder_blocks.")):
        layers = sorted({int(k[len(hf_prefix) :].split(".")[0]) for k in sd if k.startswith(hf_prefix)})
        for i in layers:
            src, dst = f"{hf_prefix}{i}.", f"{official_prefix}{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.qkv.{kind}"] = np.concatenate(
                    [sd.pop(f"{src}attention.{p}_proj.{kind}") for p in "qkv"]
                )
            renames |= {
                f"{src}attention.o_proj.": f"{dst}attn.proj.",
                f"{src}layernorm_before.": f"{dst}norm1.",
                f"{src}layernorm_after.": f"{dst}norm2.",
                f"{src}mlp.": f"{dst}mlp.",
            }
    for key in list(sd):
        prefix = next(p for p in renames if key.startswith(p))
        out[renames[prefix] + key[len(prefix) :]] = sd.pop(key)
    return out


def our_model(arch: Arch):
    config = mae.model_config(
        "B/16",
        width=arch.width,
        depth=arch.depth,
        num_heads=arch.heads,
        patch_size=arch.patch_size,
        image_size=arch.image_size,
        channels=arch.channels,
        decoder_width=arch.decoder_width,
        decoder_depth=arch.decoder_depth,
        decoder_num_heads=arch.decoder_heads,
    )
    return mae.build_mae(config)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_mae_matches_transformers_vitmae(arch: Arch):
    reference = hf_model(arch, seed=0)
    model = our_model(arch)
    params = mae_checkpoint.from_state_dict(hf_to_official(reference.state_dict()), model)

    rng = np.random.default_rng(1)
    images = rng.normal(size=(arch.batch, arch.channels, arch.image_size, arch.image_size)).astype(np.float32)
    layout = masking.TokenLayout(model.grid, MASK_RATIO)
    noise = rng.uniform(size=(arch.batch, layout.num_tokens)).astype(np.float32)

    with torch.no_grad():
        pixels, torch_noise = torch.from_numpy(images), torch.from_numpy(noise)
        expected = reference(pixel_values=pixels, noise=torch_noise)
        expected_latent = reference.vit(pixel_values=pixels, noise=torch_noise).last_hidden_state.numpy()
    expected_pred = expected.logits.numpy()  # [B, N, P] in grid order

    ids = masking.random_masking(noise, layout)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    output = jax.jit(model.apply, static_argnames="predict_visible")(
        {"params": params}, nhwc, ids.visible, ids.decoded, predict_visible=True
    )
    loss = mae.reconstruction_loss(nhwc, output, ids.decoded, ids.thrown, model.patch_size)

    batch_index = np.arange(arch.batch)[:, None]
    latent_error = np.abs(np.asarray(output.latent) - expected_latent).max()
    pred_error = max(
        np.abs(np.asarray(output.pred_decoded) - expected_pred[batch_index, ids.decoded]).max(),
        np.abs(np.asarray(output.pred_visible) - expected_pred[batch_index, ids.visible]).max(),
    )
    loss_error = abs(float(loss) - expected.loss.item())
    print(f"{arch.name}: |loss| {loss_error:.2e}, |pred| {pred_error:.2e}, |latent| {latent_error:.2e}")
    assert loss_error <= LOSS_ATOL
    assert pred_error <= OUTPUT_ATOL
    assert latent_error <= OUTPUT_ATOL
    # The masked set is MAE's: transformers' mask marks exactly our decoded ids.
    np.testing.assert_array_equal(np.sort(ids.decoded), np.stack([np.flatnonzero(m) for m in expected.mask.numpy()]))
