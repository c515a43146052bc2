"""ViT encoder and MAE model: geometry, index convention, initialisation, dtypes, logical axes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from prmim_jax import masking
from prmim_jax.models import layers, mae, vit


def test_sincos_table_layout_is_col_then_row_with_a_zero_cls_row():
    dim, grid = 16, (3, 5)  # non-square: rows != cols
    table = vit.sincos_2d(dim, grid)
    assert table.shape == (1 + 15, dim) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    for row, col in [(0, 0), (1, 3), (2, 4)]:
        token = 1 + row * grid[1] + col
        expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(table[token], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("Ti/16", (192, 12, 3, 16)),
        ("S/16", (384, 12, 6, 16)),
        ("B/16", (768, 12, 12, 16)),
        ("L/14", (1024, 24, 16, 14)),
        ("H/14", (1280, 32, 16, 14)),
        ("B/2", (768, 12, 12, 2)),
    ],
)
def test_named_variants_have_the_vit_sizes(variant, expected):
    size = vit.parse_variant(variant)
    assert (size.width, size.depth, size.num_heads, size.patch_size) == expected


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        vit.parse_variant("X/16")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=29), "not a multiple of patch_size"),
        (dict(num_heads=5), "divisible by its number of heads"),
        (dict(dtype="float16"), "choose 'float32' or 'bfloat16'"),
    ],
)
def test_impossible_model_configs_fail_before_compiling(overrides, message):
    with pytest.raises(ValueError, match=message):
        mae.build_mae(tiny_model_config(**overrides))


def test_output_shapes_follow_the_token_ids(tiny_mae, tiny_batch, tiny_params):
    images, ids = tiny_batch
    out = tiny_mae.apply({"params": tiny_params}, images, ids.visible, ids.decoded, predict_visible=True)
    assert out.latent.shape == (4, 1 + 49, 32)
    assert out.pred_decoded.shape == (4, 147, 4) and out.pred_decoded.dtype == jnp.float32
    assert out.pred_visible.shape == (4, 49, 4)
    assert tiny_mae.apply({"params": tiny_params}, images, ids.visible, ids.decoded).pred_visible is None


def test_outputs_follow_the_order_of_the_ids(tiny_mae, tiny_batch, tiny_params):
    images, ids = tiny_batch
    perm_vis, perm_dec = np.random.default_rng(1).permutation(49), np.random.default_rng(2).permutation(147)
    out = tiny_mae.apply({"params": tiny_params}, images, ids.visible, ids.decoded, predict_visible=True)
    shuffled = tiny_mae.apply(
        {"params": tiny_params}, images, ids.visible[:, perm_vis], ids.decoded[:, perm_dec], predict_visible=True
    )
    np.testing.assert_allclose(shuffled.latent[:, 1:], out.latent[:, 1:][:, perm_vis], atol=1e-5)
    np.testing.assert_allclose(shuffled.pred_decoded, out.pred_decoded[:, perm_dec], atol=1e-5)


def test_encoder_without_ids_sees_every_token(tiny_mae, tiny_batch, tiny_params):
    images, _ = tiny_batch
    encoder = vit.Encoder(2, (28, 28), 32, 2, 4, 128)
    all_ids = jnp.broadcast_to(jnp.arange(196), (4, 196))
    params = {"params": tiny_params["encoder"]}
    np.testing.assert_allclose(encoder.apply(params, images), encoder.apply(params, images, all_ids), atol=1e-6)


def test_visible_tokens_alone_determine_the_latent(tiny_mae, tiny_batch, tiny_params):
    images, ids = tiny_batch
    masked_pixels = np.zeros((4, 196), bool)
    np.put_along_axis(masked_pixels, ids.decoded, True, axis=1)
    pixel_mask = vit.unpatchify(jnp.asarray(masked_pixels, jnp.float32)[..., None].repeat(4, -1), 2, (14, 14))
    scrambled = jnp.where(pixel_mask > 0, 100.0, images)
    a = tiny_mae.apply({"params": tiny_params}, images, ids.visible, ids.decoded)
    b = tiny_mae.apply({"params": tiny_params}, scrambled, ids.visible, ids.decoded)
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(a.pred_decoded, b.pred_decoded)


def test_wrong_image_geometry_is_a_clear_error(tiny_mae, tiny_batch, tiny_params):
    _, ids = tiny_batch
    with pytest.raises(ValueError, match="3 channels; the model was built for 1"):
        tiny_mae.apply({"params": tiny_params}, jnp.zeros((4, 28, 28, 3)), ids.visible, ids.decoded)
    with pytest.raises(ValueError, match=r"built for \(28, 28\)"):
        tiny_mae.apply({"params": tiny_params}, jnp.zeros((4, 32, 32, 1)), ids.visible, ids.decoded)


def test_every_parameter_names_its_logical_axes(tiny_variables):
    allowed = {None, "embed", "decoder_embed", "mlp", "heads", "kv", "patch"}
    leaves = jax.tree_util.tree_leaves_with_path(
        tiny_variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, name
        assert set(leaf.names) <= allowed, name
        assert any(n is not None for n in leaf.names), f"{name} names no axis"


def test_flattened_cpu_matmuls_change_no_parameter_value_or_gradient(monkeypatch, tiny_mae, tiny_batch):
    # On the CPU backend every linear layer multiplies [B, T, D] activations as one [B T, D] matrix (faster
    # weight gradients, layers.flattens_tokens); a model must not depend on it: same tree, loss and gradients.
    images, ids = tiny_batch

    def loss_and_grads():
        variables = tiny_mae.init(jax.random.key(0), images, ids.visible, ids.decoded)
        params = nn.unbox(variables)["params"]

        def loss(params):
            out = tiny_mae.apply({"params": params}, images, ids.visible, ids.decoded)
            return mae.reconstruction_loss(images, out, ids.decoded, None, tiny_mae.patch_size)

        return jax.tree.map(lambda x: x.shape, variables), *jax.jit(jax.value_and_grad(loss))(params)

    assert layers.flattens_tokens()  # the suite runs on the CPU backend
    shapes, flat_loss, flat_grads = loss_and_grads()
    monkeypatch.setattr(layers, "flattens_tokens", lambda: False)
    layered_shapes, layered_loss, layered_grads = loss_and_grads()
    assert shapes == layered_shapes
    np.testing.assert_allclose(flat_loss, layered_loss, rtol=1e-6)
    for flat, layered in zip(jax.tree.leaves(flat_grads), jax.tree.leaves(layered_grads), strict=True):
        np.testing.assert_allclose(flat, layered, rtol=1e-4, atol=1e-7)


def test_initialisation_follows_the_official_mae(tiny_params):
    enc, dec = tiny_params["encoder"], tiny_params["decoder"]
    block = enc["transformer"]["block_0"]

    def within_xavier(kernel, fan_in, fan_out):
        bound = math.sqrt(6 / (fan_in + fan_out))
        return np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound

    # q, k and v keep the fans of the official fused [3D, D] qkv linear.
    assert within_xavier(block["attn"]["query"]["kernel"], 32, 96)
    assert within_xavier(block["attn"]["out"]["kernel"], 32, 32)
    assert within_xavier(block["mlp"]["fc1"]["kernel"], 32, 128)
    assert within_xavier(enc["patch_embed"]["kernel"], 4, 32)
    assert within_xavier(dec["embed"]["kernel"], 32, 16)
    assert within_xavier(tiny_params["pred"]["kernel"], 16, 4)
    for bias in (
        block["attn"]["query"]["bias"],
        block["mlp"]["fc2"]["bias"],
        dec["embed"]["bias"],
        tiny_params["pred"]["bias"],
    ):
        np.testing.assert_array_equal(bias, 0.0)
    # The patch embedding keeps PyTorch's Conv2d bias init, U(+-1/sqrt(fan_in)).
    assert 0 < np.abs(enc["patch_embed"]["bias"]).max() <= 1 / math.sqrt(4)
    np.testing.assert_array_equal(block["norm1"]["scale"], 1.0)
    np.testing.assert_array_equal(block["norm1"]["bias"], 0.0)


def test_cls_and_mask_tokens_start_normal_with_std_0_02():
    model = mae.build_mae(tiny_model_config(width=512, decoder_width=512, decoder_num_heads=4, num_heads=4, depth=1))
    layout = masking.TokenLayout(model.grid, 0.75)
    ids = masking.random_masking(np.random.default_rng(0).uniform(size=(1, 196)), layout)
    shapes = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), ids.visible, ids.decoded))
    )
    assert shapes["params"]["decoder"]["mask_token"].shape == (1, 1, 512)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 28, 28, 1)), ids.visible, ids.decoded))["params"]
    for token in (params["encoder"]["cls_token"], params["decoder"]["mask_token"]):
        assert 0.015 < float(np.std(token)) < 0.025 and abs(float(np.mean(token))) < 0.004


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_stays_close(tiny_batch, tiny_params):
    images, ids = tiny_batch
    f32 = mae.build_mae(tiny_model_config())
    bf16 = mae.build_mae(tiny_model_config(dtype="bfloat16"))
    variables = bf16.init(jax.random.key(0), images, ids.visible, ids.decoded)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}

    out32 = f32.apply({"params": tiny_params}, images, ids.visible, ids.decoded)
    out16 = bf16.apply({"params": tiny_params}, images, ids.visible, ids.decoded)
    assert out16.latent.dtype == jnp.bfloat16 and out16.pred_decoded.dtype == jnp.float32
    relative = np.linalg.norm(out16.pred_decoded - out32.pred_decoded) / np.linalg.norm(out32.pred_decoded)
    assert relative < 2e-2
    loss32 = mae.reconstruction_loss(images, out32, ids.decoded, ids.thrown, 2)
    loss16 = mae.reconstruction_loss(images, out16, ids.decoded, ids.thrown, 2)
    assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)
