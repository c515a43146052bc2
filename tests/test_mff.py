"""MFF: its fusion and loss against an independent implementation, PR-MIM's switch, and one run of the trainer.

The reference is transformers' ``ViTMAEForPreTraining`` (PyTorch, CPU) with
the fusion written out in PyTorch from the description (mmpretrain's
``MFFViT``): the blocks' outputs are its ``hidden_states``, the fused
features go through its encoder norm and its decoder, and the norm-pix loss
is computed over the masked tokens. The weights are random, the fusion
weights far from uniform.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from test_transformers_equivalence import MASK_RATIO, Arch, hf_model, hf_to_official

from prmim_jax import masking, methods, optim
from prmim_jax.data import schema
from prmim_jax.interop import mae_checkpoint
from prmim_jax.methods import mff as mff_method
from prmim_jax.models import layers, vit
from prmim_jax.models import mae as mae_lib

LOSS_ATOL = 1e-5
OUTPUT_ATOL = 2e-5
FUSED_BLOCKS = (1, 3)  # of 4: two projected blocks and the last
DEFAULT_SECTIONS = dict(optimizer=optim.optimizer_config(), data=schema.data_config())
ARCH = Arch("gray_28px_patch2_depth4", 28, 2, 1, 32, 4, 4, 32, 1, 4)


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def model_section(arch: Arch = ARCH):
    return mae_lib.model_config(
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


def mff(reconstruction="full", model=None, **overrides):
    """The MFF method on ``model`` (a model section; ``ARCH``'s by default), ``FUSED_BLOCKS`` unless overridden."""
    section = mff_method.default_config(reconstruction=reconstruction, **(dict(fused_blocks=FUSED_BLOCKS) | overrides))
    sections = dict(model=model or model_section(), method=section) | DEFAULT_SECTIONS
    return methods.build(ml_collections.ConfigDict(sections))


def random_fusion(rng, width: int) -> dict:
    """Fusion parameters far from their initial values: random projections, unequal weights."""
    return {
        "weights": np.array([0.3, -1.2, 0.9], np.float32),
        **{
            f"projection_{k}": {
                "kernel": (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32),
                "bias": (0.05 * rng.normal(size=width)).astype(np.float32),
            }
            for k in range(len(FUSED_BLOCKS))
        },
    }


def mff_params(reference, rng) -> dict:
    """The reference's MAE weights (encoder, decoder, head) in our MFF model, its encoder norm as the fusion's."""
    plain = mae_checkpoint.from_state_dict(hf_to_official(reference.state_dict()), mff().model)
    encoder = dict(plain["encoder"])
    transformer = dict(encoder["transformer"])
    norm = transformer.pop("norm")
    encoder["transformer"] = transformer
    return plain | {"encoder": encoder, "fusion": random_fusion(rng, ARCH.width) | {"norm": norm}}


def reference_mff(reference, fusion: dict, images: np.ndarray, noise: np.ndarray):
    """``(loss, latent [B, 1 + N_vis, D], pred [B, N, P] grid order)`` of MFF written out on transformers' MAE."""
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        encoded = reference.vit(pixel_values=pixels, noise=torch.from_numpy(noise), output_hidden_states=True)
        blocks = encoded.hidden_states  # [embeddings, block 1, ..., block L]
        features = []
        for k, block in enumerate(FUSED_BLOCKS):
            projection = fusion[f"projection_{k}"]
            kernel, bias = (torch.from_numpy(projection[n]) for n in ("kernel", "bias"))
            features.append(blocks[block] @ kernel + bias)
        features.append(blocks[ARCH.depth])
        weights = torch.softmax(torch.from_numpy(fusion["weights"]), dim=0)
        latent = reference.vit.layernorm(sum(w * f for w, f in zip(weights, features, strict=True)))
        pred = reference.decoder(latent, encoded.ids_restore).logits
        target = reference.patchify(pixels)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        per_token = ((pred - target) ** 2).mean(dim=-1)
        loss = (per_token * encoded.mask).sum() / encoded.mask.sum()
    return loss.item(), latent.numpy(), pred.numpy()


def test_mff_matches_transformers_vitmae_with_the_fusion_written_out():
    reference = hf_model(ARCH, seed=0)
    rng = np.random.default_rng(1)
    params = mff_params(reference, rng)
    images = rng.normal(size=(ARCH.batch, ARCH.channels, ARCH.image_size, ARCH.image_size)).astype(np.float32)
    noise = rng.uniform(size=(ARCH.batch, (ARCH.image_size // ARCH.patch_size) ** 2)).astype(np.float32)
    expected_loss, expected_latent, expected_pred = reference_mff(reference, params["fusion"], images, noise)

    method = mff()
    ids = masking.random_masking(noise, masking.TokenLayout(method.model.grid, MASK_RATIO))
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    output = jax.jit(method.model.apply)({"params": params}, nhwc, ids.visible, ids.decoded)
    loss = method.objective(params, nhwc, ids)

    rows = np.arange(ARCH.batch)[:, None]
    loss_error = abs(float(loss) - expected_loss)
    latent_error = np.abs(np.asarray(output.latent) - expected_latent).max()
    pred_error = np.abs(np.asarray(output.pred_decoded) - expected_pred[rows, ids.decoded]).max()
    print(f"MFF: |loss| {loss_error:.2e}, |latent| {latent_error:.2e}, |pred| {pred_error:.2e}")
    assert loss_error <= LOSS_ATOL
    assert latent_error <= OUTPUT_ATOL
    assert pred_error <= OUTPUT_ATOL


def test_evaluation_encoder_is_the_plain_vit_with_the_fusion_norm_on_the_last_block():
    reference = hf_model(ARCH, seed=2)
    params = mff_params(reference, np.random.default_rng(3))
    module, encoder_params = mff().encoder(params)
    images = np.random.default_rng(4).normal(size=(2, ARCH.channels, ARCH.image_size, ARCH.image_size))
    images = images.astype(np.float32)
    num_tokens = (ARCH.image_size // ARCH.patch_size) ** 2
    in_order = np.tile(np.arange(num_tokens, dtype=np.float32), (2, 1))  # keeps every token, unshuffled
    reference.vit.config.mask_ratio = 0.0
    with torch.no_grad():
        expected = reference.vit(pixel_values=torch.from_numpy(images), noise=torch.from_numpy(in_order))
    tokens = module.apply({"params": encoder_params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert isinstance(module, vit.Encoder) and module.final_norm and module.taps is None
    np.testing.assert_allclose(np.asarray(tokens), expected.last_hidden_state.numpy(), atol=OUTPUT_ATOL)


def random_params(method, batch, seed: int) -> dict:
    """Random values in the shapes of ``method``'s parameters (LayerNorm scales near 1), without compiling its
    initialiser, which costs seconds at any size on XLA CPU."""
    shapes = nn.unbox(jax.eval_shape(method.init, jax.random.key(0), batch).params)
    rng = np.random.default_rng(seed)

    def value(path, shape):
        noise = 0.2 * rng.normal(size=shape.shape).astype(np.float32)
        return 1.0 + noise if layers.path_names(path)[-1] == "scale" else noise

    return jax.tree_util.tree_map_with_path(value, shapes)


def test_pr_mim_is_one_key_and_adds_only_the_thrown_tokens_loss():
    small = model_section(dataclasses.replace(ARCH, width=16, depth=2, decoder_width=16))
    partial, progressive = (mff(name, small, fused_blocks=(1,)) for name in ("partial", "progressive"))
    layout = progressive.layout
    assert mff("full", small, fused_blocks=(1,)).layout.num_thrown == 0
    assert partial.layout.num_thrown == layout.num_thrown == round(layout.num_tokens * 0.5)
    assert progressive.config.method.sampler == "furthest" and progressive.model.fused_blocks == (1,)

    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(3, 28, 28, 1)).astype(np.float32))
    ids = progressive.sample(np.stack([masking.draw_noise(rng, layout) for _ in range(3)]))
    batch = {"images": images, "ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}
    params = random_params(progressive, batch, seed=6)
    partial_params = {k: v for k, v in params.items() if k != "aggregation"}

    output = jax.jit(progressive.predict)(params, images, ids)
    assert output.pred_thrown.shape[1] == layout.num_thrown

    def loss(thrown_weight):
        return float(mae_lib.reconstruction_loss(images, output, ids.decoded, ids.thrown, 2, True, thrown_weight))

    # Progressive = partial + the thrown tokens' loss: weighted by zero, partial's objective is left.
    partial_loss, gradient = jax.jit(jax.value_and_grad(partial.objective))(partial_params, images, ids)
    assert abs(float(partial_loss) - loss(0.0)) < 1e-6 and abs(loss(1.0) - loss(0.0)) > 1e-4
    # Under partial reconstruction the fusion still learns: its projections and weights get gradient.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gradient["fusion"]))


def test_fused_blocks_must_lie_below_the_last_block():
    with pytest.raises(ValueError, match=r"method.fused_blocks=\(1, 4\).*\[1, 3\]"):
        mff(fused_blocks=(1, 4))
    with pytest.raises(ValueError, match="increasing"):
        mff(fused_blocks=(3, 1))
