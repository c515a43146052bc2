"""SimMIM, its partial and PR-MIM variants, and SimMIM's unit masks.

Numerics are checked against an independent implementation: transformers'
``ViTForMaskedImageModeling`` (PyTorch, CPU), which is SimMIM's ViT, 1x1
convolution + pixel-shuffle head and L1 loss. Its weights are renamed to the
official SimMIM layout and read by our importer, so the tests also cover the
importer. transformers' ViT has no layer scale and no relative position bias;
the official recipe's test folds the layer scale into the branch outputs'
weights and hands the relative bias, built here from BEiT's index formula, to
transformers as an additive attention mask.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prmim_jax import masking
from prmim_jax.interop import hf_simmim
from prmim_jax.interop.mae_checkpoint import CheckpointMismatchError
from prmim_jax.models import aggregate, layers, relative_position, simmim, vit

LOSS_ATOL = 1e-5
OUTPUT_ATOL = 2e-5
MASK_RATIO = 0.6


@dataclasses.dataclass
class Arch:
    name: str
    image_size: int
    patch_size: int
    mask_patch_size: int  # SimMIM's masking unit, in pixels
    channels: int
    width: int
    depth: int
    heads: int
    batch: int = 2

    @property
    def grid(self):
        return (self.image_size // self.patch_size,) * 2

    def layout(self, throw_ratio=0.0):
        return masking.TokenLayout(
            self.grid, MASK_RATIO, throw_ratio, mask_unit=self.mask_patch_size // self.patch_size
        )


ARCHS = [
    Arch("rgb_32px_patch8", 32, 8, 16, 3, 64, 2, 4, batch=3),
    Arch("gray_28px_patch2", 28, 2, 4, 1, 64, 2, 4),
    Arch("vit_b16_224_reduced_depth", 224, 16, 32, 3, 768, 2, 12),
]
TINY = ARCHS[1]  # the 14x14 token grid and 7x7 unit grid of ViT-B/16 at 224


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def tiny_model(aggregator=None, **overrides):
    config = simmim.model_config("Ti/2", width=32, depth=2, num_heads=4, image_size=28, channels=1, drop_path_rate=0.0)
    config.update(overrides)
    return simmim.build_simmim(config, aggregator)


def sample_ids(layout, batch, sampler="random", seed=0):
    rng = np.random.default_rng(seed)
    return masking.sample(sampler, np.stack([masking.draw_noise(rng, layout) for _ in range(batch)]), layout)


def random_images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def init_params(model, images, ids, seed=0):
    return nn.unbox(model.init(jax.random.key(seed), images, *ids))["params"]


def apply(model, params, images, *ids, **kwargs):
    # Not jitted: at these sizes compiling every model costs more than running it op by op.
    return model.apply({"params": params}, images, *ids, **kwargs)


# ---------------------------------------------------------------- transformers' ViTForMaskedImageModeling


def hf_model(arch: Arch, seed: int):
    config = transformers.ViTConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=arch.channels,
        hidden_size=arch.width,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads,
        intermediate_size=4 * arch.width,
        hidden_act="gelu",
        layer_norm_eps=layers.LAYER_NORM_EPS,
        qkv_bias=True,
        encoder_stride=arch.patch_size,
        attn_implementation="eager",
    )
    model = transformers.ViTForMaskedImageModeling(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias"):
                # The key bias too: the official ViT has none, and dropping it must change nothing.
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
            elif "token" in name or "position" in name:
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = np.prod(tensor.shape[1:])
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / np.sqrt(fan_in))
    return model


def our_model(arch: Arch, **overrides):
    config = simmim.model_config(
        "B/16",
        width=arch.width,
        depth=arch.depth,
        num_heads=arch.heads,
        patch_size=arch.patch_size,
        image_size=arch.image_size,
        channels=arch.channels,
        drop_path_rate=0.0,
        **overrides,
    )
    return simmim.build_simmim(config)


def bool_mask(ids, num_tokens):
    mask = np.zeros((ids.shape[0], num_tokens), bool)
    np.put_along_axis(mask, ids, True, axis=1)
    return mask


def compare_with_transformers(arch, model, params, reference, ids, images, attention_mask=None):
    """Max abs errors ``(loss, predictions, encoder output)`` of ours against transformers on the same batch."""
    num_tokens = arch.grid[0] * arch.grid[1]
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        masked = torch.from_numpy(bool_mask(ids.decoded, num_tokens))
        expected = reference(pixel_values=pixels, bool_masked_pos=masked, attention_mask=attention_mask)
        latent = reference.vit(pixel_values=pixels, bool_masked_pos=masked, attention_mask=attention_mask)
    expected_latent = latent.last_hidden_state.numpy()  # [B, 1 + N, D], grid order
    expected_pred = np.asarray(vit.patchify(expected.reconstruction.numpy().transpose(0, 2, 3, 1), arch.patch_size))

    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    output = jax.jit(model.apply, static_argnames="predict_visible")(
        {"params": params}, nhwc, ids.visible, ids.decoded, ids.thrown, predict_visible=True
    )
    loss = simmim.simmim_loss(nhwc, output, ids.decoded, ids.thrown, model.patch_size)

    rows = np.arange(arch.batch)[:, None]
    sequence = np.concatenate([np.zeros((arch.batch, 1), np.int32), 1 + ids.visible, 1 + ids.decoded], axis=1)
    latent_error = np.abs(np.asarray(output.features) - expected_latent[rows, sequence]).max()
    pred_error = max(
        np.abs(np.asarray(output.pred_decoded) - expected_pred[rows, ids.decoded]).max(),
        np.abs(np.asarray(output.pred_visible) - expected_pred[rows, ids.visible]).max(),
    )
    return abs(float(loss) - expected.loss.item()), pred_error, latent_error


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_simmim_matches_transformers_vit_for_masked_image_modeling(arch: Arch):
    reference = hf_model(arch, seed=0)
    model = our_model(arch, layer_scale_init=None, relative_position_bias="none", position_embedding="learned")
    params = hf_simmim.from_transformers(reference.state_dict(), model)

    rng = np.random.default_rng(1)
    images = rng.normal(size=(arch.batch, arch.channels, arch.image_size, arch.image_size)).astype(np.float32)
    ids = sample_ids(arch.layout(), arch.batch, seed=2)  # SimMIM's unit mask: a non-trivial, structured mask
    errors = compare_with_transformers(arch, model, params, reference, ids, images)
    print(f"{arch.name}: |loss| {errors[0]:.2e}, |pred| {errors[1]:.2e}, |latent| {errors[2]:.2e}")
    assert errors[0] <= LOSS_ATOL
    assert errors[1] <= OUTPUT_ATOL
    assert errors[2] <= OUTPUT_ATOL


def beit_relative_bias(table: np.ndarray, grid) -> np.ndarray:
    """``[heads, 1 + N, 1 + N]``: BEiT's relative position bias written out pair by pair (query first, cls at 0)."""
    rows, cols = grid
    size = (2 * rows - 1) * (2 * cols - 1) + 3
    index = np.empty((1 + rows * cols,) * 2, np.int64)
    for i in range(rows * cols):
        for j in range(rows * cols):
            (ri, ci), (rj, cj) = divmod(i, cols), divmod(j, cols)
            index[1 + i, 1 + j] = (ri - rj + rows - 1) * (2 * cols - 1) + (ci - cj + cols - 1)
    index[0, :] = size - 3  # cls query -> every key
    index[:, 0] = size - 2  # every query -> cls key
    index[0, 0] = size - 1
    return table[index].transpose(2, 0, 1)


@pytest.mark.parametrize("arch", ARCHS[:2], ids=lambda a: a.name)
def test_official_recipe_matches_transformers_with_thrown_tokens_left_out(arch: Arch):
    """Layer scale, the shared relative bias, no position table, and partial reconstruction's thrown tokens.

    transformers runs the whole grid with the thrown tokens masked out as keys,
    so its outputs at the other tokens are what an encoder without them computes.
    """
    reference = hf_model(arch, seed=3)
    model = our_model(arch, layer_scale_init=0.1, relative_position_bias="shared", position_embedding="none")
    rng = np.random.default_rng(4)
    official = hf_simmim.official_from_transformers(reference.state_dict())
    del official["encoder.pos_embed"]
    size = relative_position.relative_position_bias_size(arch.grid)
    table = 0.5 * rng.normal(size=(size, arch.heads)).astype(np.float32)
    official["encoder.rel_pos_bias.relative_position_bias_table"] = table
    official["encoder.rel_pos_bias.relative_position_index"] = relative_position.relative_position_index(arch.grid)
    with torch.no_grad():
        reference.vit.embeddings.position_embeddings.zero_()
        for i, layer in enumerate(reference.vit.layers):
            for gamma_name, branch in (("gamma_1", layer.attention.o_proj), ("gamma_2", layer.mlp.fc2)):
                gamma = (0.1 + 0.5 * rng.normal(size=arch.width)).astype(np.float32)
                official[f"encoder.blocks.{i}.{gamma_name}"] = gamma
                # gamma * (W x + b) = (diag(gamma) W) x + gamma b
                branch.weight.mul_(torch.from_numpy(gamma)[:, None])
                branch.bias.mul_(torch.from_numpy(gamma))
    params = hf_simmim.from_official(official, model)

    ids = sample_ids(arch.layout(throw_ratio=0.3), arch.batch, sampler="furthest", seed=5)
    assert ids.thrown.shape[1] > 0
    thrown_keys = np.zeros((arch.batch, 1, 1, 1 + ids.visible.shape[1] + ids.decoded.shape[1] + ids.thrown.shape[1]))
    np.put_along_axis(thrown_keys, 1 + ids.thrown[:, None, None, :], -np.inf, axis=3)
    bias = beit_relative_bias(table, arch.grid)[None] + thrown_keys
    images = rng.normal(size=(arch.batch, arch.channels, arch.image_size, arch.image_size)).astype(np.float32)
    errors = compare_with_transformers(
        arch, model, params, reference, ids, images, attention_mask=torch.from_numpy(bias.astype(np.float32))
    )
    print(f"{arch.name} official recipe: |loss| {errors[0]:.2e}, |pred| {errors[1]:.2e}, |latent| {errors[2]:.2e}")
    assert errors[0] <= LOSS_ATOL
    assert errors[1] <= OUTPUT_ATOL
    assert errors[2] <= OUTPUT_ATOL


def test_importer_names_a_missing_key_and_a_foreign_relative_index():
    arch = ARCHS[0]
    model = our_model(arch)  # the official recipe: layer scale and shared relative bias expected
    official = hf_simmim.official_from_transformers(hf_model(arch, seed=0).state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.pos_embed"):
        hf_simmim.from_official(official, model)
    del official["encoder.pos_embed"]
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'encoder\.rel_pos_bias"):
        hf_simmim.from_official(official, model)
    official["encoder.rel_pos_bias.relative_position_bias_table"] = np.zeros(
        (relative_position.relative_position_bias_size(arch.grid), arch.heads), np.float32
    )
    for i in range(arch.depth):
        official[f"encoder.blocks.{i}.gamma_1"] = official[f"encoder.blocks.{i}.gamma_2"] = np.ones(arch.width)
    official["encoder.rel_pos_bias.relative_position_index"] = relative_position.relative_position_index(arch.grid).T
    with pytest.raises(CheckpointMismatchError, match="relative position index"):
        hf_simmim.from_official(official, model)


# ---------------------------------------------------------------- the model's properties


def test_relative_position_index_is_beits():
    table = np.arange(relative_position.relative_position_bias_size((3, 4)))[:, None]
    expected = beit_relative_bias(table, (3, 4))[0]
    np.testing.assert_array_equal(relative_position.relative_position_index((3, 4)), expected)


def test_relative_bias_is_one_table_shared_by_every_block():
    model = tiny_model()
    layout = masking.TokenLayout(model.grid, MASK_RATIO, mask_unit=2)
    params = init_params(model, random_images((2, 28, 28, 1)), sample_ids(layout, 2))
    flat = {"/".join(layers.path_names(path)): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    tables = [name for name in flat if "relative_position_bias" in name]
    assert tables == ["encoder/relative_position_bias"]
    assert flat[tables[0]].shape == (relative_position.relative_position_bias_size((14, 14)), 4)
    np.testing.assert_array_equal(flat[tables[0]], 0.0)  # BEiT / SimMIM start it at zero


def test_relative_bias_of_any_token_subset_is_the_full_grid_bias_restricted_to_it():
    grid = (5, 6)
    table = jax.random.normal(jax.random.key(1), (relative_position.relative_position_bias_size(grid), 3))
    full = relative_position.relative_bias(table, grid, None)  # [heads, 1 + N, 1 + N], grid order
    np.testing.assert_array_equal(full, beit_relative_bias(np.asarray(table), grid))
    ids = np.random.default_rng(0).permutation(30)[:20].reshape(2, 10).astype(np.int32)
    subset = relative_position.relative_bias(table, grid, jnp.asarray(ids))
    sequence = np.concatenate([np.zeros((2, 1), np.int32), 1 + ids], axis=1)
    for b in range(2):
        np.testing.assert_array_equal(subset[b], np.asarray(full)[:, sequence[b]][:, :, sequence[b]])


def test_encoder_output_follows_its_tokens_in_any_order():
    """With the relative bias and layer scale of the recipe, permuting the input ids permutes the outputs."""
    model = tiny_model()
    layout = masking.TokenLayout(model.grid, MASK_RATIO, mask_unit=2)
    ids = sample_ids(layout, 2)
    images = random_images((2, 28, 28, 1))
    params = init_params(model, images, ids)
    params["encoder"]["relative_position_bias"] = jax.random.normal(
        jax.random.key(2), params["encoder"]["relative_position_bias"].shape
    )
    out = apply(model, params, images, ids.visible, ids.decoded, predict_visible=True)
    perm_v, perm_d = np.random.default_rng(3).permutation(ids.visible.shape[1]), np.arange(ids.decoded.shape[1])[::-1]
    permuted = apply(model, params, images, ids.visible[:, perm_v], ids.decoded[:, perm_d], predict_visible=True)
    np.testing.assert_allclose(permuted.pred_visible, out.pred_visible[:, perm_v], atol=1e-5)
    np.testing.assert_allclose(permuted.pred_decoded, out.pred_decoded[:, perm_d], atol=1e-5)


def test_partial_reconstruction_never_reads_the_thrown_tokens_pixels():
    model = tiny_model()
    layout = masking.TokenLayout(model.grid, MASK_RATIO, 0.3, mask_unit=2)
    ids = sample_ids(layout, 2, sampler="furthest")
    images = random_images((2, 28, 28, 1))
    params = init_params(model, images, ids)
    out = apply(model, params, images, *ids)
    assert out.features.shape[1] == 1 + layout.num_visible + layout.num_decoded  # thrown tokens are absent
    assert out.pred_thrown is None
    patches = np.array(vit.patchify(images, 2))
    np.put_along_axis(patches, ids.thrown[:, :, None], 1e3, axis=1)
    changed = vit.unpatchify(jnp.asarray(patches), 2, model.grid)
    out_changed = apply(model, params, changed, *ids)
    np.testing.assert_array_equal(out_changed.features, out.features)
    np.testing.assert_array_equal(out_changed.pred_decoded, out.pred_decoded)
    # ... and neither does the loss: thrown tokens get none.
    loss = simmim.simmim_loss(images, out, ids.decoded, ids.thrown, 2)
    assert float(loss) == float(simmim.simmim_loss(changed, out_changed, ids.decoded, ids.thrown, 2))


def test_prmim_predicts_every_masked_token_and_supervises_the_aggregator():
    model = tiny_model(aggregate.build_aggregator("dwconv", (14, 14), 7, jnp.float32))
    layout = masking.TokenLayout(model.grid, MASK_RATIO, 0.3, mask_unit=2)
    ids = sample_ids(layout, 2, sampler="furthest")
    images = random_images((2, 28, 28, 1))
    params = init_params(model, images, ids)
    out = apply(model, params, images, *ids)
    assert out.pred_decoded.shape == (2, layout.num_decoded, 4)
    assert out.pred_thrown.shape == (2, layout.num_thrown, 4)
    assert layout.num_decoded + layout.num_thrown == layout.num_masked

    def loss(params):
        return simmim.simmim_loss(images, model.apply({"params": params}, images, *ids), ids.decoded, ids.thrown, 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["aggregator"]["kernel"]).max()) > 0


def test_prmim_with_nothing_thrown_is_simmim_bit_for_bit():
    plain = tiny_model()
    progressive = tiny_model(aggregate.build_aggregator("dwconv", (14, 14), 7, jnp.float32))
    layout = masking.TokenLayout(plain.grid, MASK_RATIO, 0.0, mask_unit=2)
    ids = sample_ids(layout, 2)
    images = random_images((2, 28, 28, 1))
    params = init_params(progressive, images, ids)
    plain_params = {k: v for k, v in params.items() if k != "aggregator"}

    def loss(model, params):
        output = model.apply({"params": params}, images, *ids)
        return simmim.simmim_loss(images, output, ids.decoded, ids.thrown, 2)

    loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    plain_loss, plain_grads = loss_and_grads(plain, plain_params)
    progressive_loss, progressive_grads = loss_and_grads(progressive, params)
    assert float(plain_loss) == float(progressive_loss)
    for name in ("encoder", "head"):
        jax.tree.map(np.testing.assert_array_equal, plain_grads[name], progressive_grads[name])


def test_loss_is_simmims_masked_pixel_l1_and_ignores_visible_pixels():
    model = tiny_model(aggregate.build_aggregator("dwconv", (14, 14), 7, jnp.float32))
    layout = masking.TokenLayout(model.grid, MASK_RATIO, 0.3, mask_unit=2)
    ids = sample_ids(layout, 2, sampler="random_throw")
    images = random_images((2, 28, 28, 1))
    out = apply(model, init_params(model, images, ids), images, *ids)

    # The official formula on whole images: the reconstruction holds our predictions at the masked tokens.
    rows = np.arange(2)[:, None]
    reconstruction = np.zeros((2, 196, 4), np.float32)
    reconstruction[rows, ids.decoded] = out.pred_decoded
    reconstruction[rows, ids.thrown] = out.pred_thrown
    reconstruction[rows, ids.visible] = 123.0  # whatever the head says there must not count
    token_mask = bool_mask(np.concatenate([ids.decoded, ids.thrown], 1), 196).reshape(2, 14, 14)
    pixel_mask = token_mask.repeat(2, axis=1).repeat(2, axis=2)[..., None]  # [B, H, W, 1], as SimMIM's
    l1 = np.abs(np.asarray(images) - np.asarray(vit.unpatchify(jnp.asarray(reconstruction), 2, (14, 14))))
    expected = (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / images.shape[-1]
    loss = simmim.simmim_loss(images, out, ids.decoded, ids.thrown, 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)

    patches = np.array(vit.patchify(images, 2))
    np.put_along_axis(patches, ids.visible[:, :, None], -7.0, axis=1)
    other_visible = vit.unpatchify(jnp.asarray(patches), 2, (14, 14))
    assert float(simmim.simmim_loss(other_visible, out, ids.decoded, ids.thrown, 2)) == float(loss)


def test_layer_scale_starts_at_its_init_value_and_is_absent_when_off():
    layout = masking.TokenLayout((14, 14), MASK_RATIO, mask_unit=2)
    ids, images = sample_ids(layout, 1), random_images((1, 28, 28, 1))
    params = init_params(tiny_model(layer_scale_init=0.25), images, ids)
    for i in range(2):
        block = params["encoder"]["transformer"][f"block_{i}"]
        np.testing.assert_array_equal(block["layer_scale_attn"], np.full(32, 0.25, np.float32))
        np.testing.assert_array_equal(block["layer_scale_mlp"], np.full(32, 0.25, np.float32))
    block = init_params(tiny_model(layer_scale_init=None), images, ids)["encoder"]["transformer"]["block_0"]
    assert sorted(block) == ["attn", "mlp", "norm1", "norm2"]  # MAE's blocks, unchanged


def test_official_init_draws_truncated_normal_kernels_rescaled_by_depth():
    model = tiny_model(depth=3)
    layout = masking.TokenLayout((14, 14), MASK_RATIO, mask_unit=2)
    ids, images = sample_ids(layout, 1), random_images((1, 28, 28, 1))
    boxed = jax.jit(model.init)(jax.random.key(0), images, *ids)["params"]
    redrawn = simmim.official_init(boxed, jax.random.key(1))
    assert jax.tree.structure(redrawn) == jax.tree.structure(boxed)  # boxes (logical axes) kept
    params, before = nn.unbox(redrawn), nn.unbox(boxed)
    for i in range(3):
        block = params["encoder"]["transformer"][f"block_{i}"]
        bound = simmim.INIT_STD / np.sqrt(2 * (i + 1))
        assert np.abs(block["attn"]["out"]["kernel"]).max() <= bound
        assert np.abs(block["mlp"]["fc2"]["kernel"]).max() <= bound
        fc1 = np.asarray(block["mlp"]["fc1"]["kernel"])
        assert np.abs(fc1).max() <= simmim.INIT_STD and 0.4 * simmim.INIT_STD < fc1.std() < 0.7 * simmim.INIT_STD
    np.testing.assert_array_equal(params["head"]["kernel"], before["head"]["kernel"])
    np.testing.assert_array_equal(params["encoder"]["cls_token"], before["encoder"]["cls_token"])


def test_encoder_of_encodes_every_token_in_grid_order():
    model = tiny_model()
    layout = masking.TokenLayout(model.grid, MASK_RATIO, mask_unit=2)
    images = random_images((2, 28, 28, 1))
    params = init_params(model, images, sample_ids(layout, 2))
    features = jax.jit(simmim.encoder_of(model).apply)({"params": params["encoder"]}, images)
    assert features.shape == (2, 197, 32)
    every = jnp.broadcast_to(jnp.arange(196, dtype=jnp.int32), (2, 196))
    out = apply(model, params, images, every, jnp.zeros((2, 0), jnp.int32))
    np.testing.assert_allclose(features, out.features, atol=1e-5)


def test_drop_path_is_off_unless_asked_for():
    model = tiny_model(drop_path_rate=0.5)
    layout = masking.TokenLayout(model.grid, MASK_RATIO, mask_unit=2)
    ids, images = sample_ids(layout, 4), random_images((4, 28, 28, 1))
    params = init_params(model, images, ids)
    first, second = (apply(model, params, images, *ids) for _ in range(2))
    np.testing.assert_array_equal(first.pred_decoded, second.pred_decoded)
    dropped = apply(model, params, images, *ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(dropped.pred_decoded, first.pred_decoded)


def test_bfloat16_model_builds_and_predicts_float32():
    model = tiny_model(aggregate.build_aggregator("dwconv", (14, 14), 7, jnp.bfloat16), dtype="bfloat16")
    layout = masking.TokenLayout(model.grid, MASK_RATIO, 0.3, mask_unit=2)
    ids, images = sample_ids(layout, 2, sampler="furthest"), random_images((2, 28, 28, 1))
    params = init_params(model, images, ids)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = apply(model, params, images, *ids)
    assert out.features.dtype == jnp.bfloat16
    assert out.pred_decoded.dtype == out.pred_thrown.dtype == jnp.float32
    assert np.isfinite(float(simmim.simmim_loss(images, out, ids.decoded, ids.thrown, 2)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=29), "not a multiple of patch_size"),
        (dict(position_embedding="rope"), "position_embedding"),
        (dict(relative_position_bias="per_block"), "relative_position_bias"),
        (dict(position_embedding="none", relative_position_bias="none"), "no way to tell positions apart"),
        (dict(layer_scale_init=0.0), "layer_scale_init"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(dtype="float16"), "dtype"),
        (dict(remat="everything"), "remat"),
    ],
)
def test_build_simmim_rejects_impossible_configs_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


# ---------------------------------------------------------------- SimMIM's unit masks


def test_unit_masks_count_as_simmims_mask_generator():
    # ViT-B/16 at 224 with 32-pixel units: ceil(49 * 0.6) = 30 of 49 units, 120 of 196 tokens.
    layout = masking.TokenLayout((14, 14), 0.6, mask_unit=2)
    assert (layout.unit_grid, layout.num_masked, layout.num_visible) == ((7, 7), 120, 76)
    # int(np.ceil(10 * 0.8)) = 8, where MAE's rule masks 10 - int(10 * (1 - 0.8)) = 10 - int(1.9999999999999996) = 9.
    assert masking.TokenLayout((2, 5), 0.8, mask_unit=1).num_masked == 8
    assert masking.TokenLayout((2, 5), 0.8).num_masked == 9
    token_throw = masking.TokenLayout((14, 14), 0.6, 0.3, mask_unit=2)
    unit_throw = masking.TokenLayout((14, 14), 0.6, 0.3, mask_unit=2, throw_granularity="unit")
    assert (token_throw.num_thrown, token_throw.num_decoded) == (59, 61)  # round(196 * 0.3) tokens
    assert (unit_throw.num_thrown, unit_throw.num_decoded) == (60, 60)  # round(49 * 0.3) = 15 units


def units_of(ids, grid=(14, 14), unit=2):
    """``[B, U]`` how many of each unit's tokens are in ``ids``."""
    marks = bool_mask(ids, grid[0] * grid[1]).reshape(-1, grid[0] // unit, unit, grid[1] // unit, unit)
    return marks.sum(axis=(2, 4)).reshape(marks.shape[0], -1)


@pytest.mark.parametrize("granularity", ["token", "unit"])
@pytest.mark.parametrize("sampler", ["random", "random_throw", "furthest", "furthest_seeded"])
def test_unit_masks_mask_whole_units_and_partition_the_grid(sampler, granularity):
    throw = 0.0 if sampler == "random" else 0.3
    layout = masking.TokenLayout((14, 14), 0.6, throw, mask_unit=2, throw_granularity=granularity)
    ids = sample_ids(layout, 16, sampler)
    masking.check_token_ids(ids, layout)
    masked_per_unit = units_of(np.concatenate([ids.decoded, ids.thrown], 1))
    assert set(np.unique(masked_per_unit)) == {0, 4}  # a unit is masked whole or not at all
    assert ((masked_per_unit == 4).sum(1) == 30).all()
    if granularity == "unit":
        assert set(np.unique(units_of(ids.thrown))) <= {0, 4}
    # Every sampler sees the visible units that plain SimMIM masking leaves.
    plain = sample_ids(masking.TokenLayout((14, 14), 0.6, mask_unit=2), 16, "random")
    np.testing.assert_array_equal(np.sort(ids.visible, 1), np.sort(plain.visible, 1))


def test_unit_furthest_sampling_keeps_decoded_units_apart():
    layout = masking.TokenLayout((14, 14), 0.6, 0.3, mask_unit=2, throw_granularity="unit")
    furthest = units_of(sample_ids(layout, 256, "furthest").decoded)
    random = units_of(sample_ids(layout, 256, "random_throw").decoded)

    def nearest_neighbour_distance(per_unit):
        rows, cols = np.divmod(np.arange(49), 7)
        out = []
        for image in per_unit:
            picked = np.flatnonzero(image)
            d = (rows[picked, None] - rows[None, picked]) ** 2 + (cols[picked, None] - cols[None, picked]) ** 2
            out.append(np.where(np.eye(len(picked), dtype=bool), np.inf, d).min(1).mean())
        return np.mean(out)

    assert nearest_neighbour_distance(furthest) > nearest_neighbour_distance(random)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=(14, 14), mask_unit=3), "does not tile"),
        (dict(grid=(14, 14), mask_unit=2, throw_granularity="patch"), "throw_granularity"),
        (dict(grid=(14, 14), throw_granularity="unit"), "needs unit masks"),
    ],
)
def test_impossible_unit_layouts_fail_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        masking.TokenLayout(mask_ratio=0.6, **kwargs)
