"""GreenMIM: the encoder over the visible mask units computes what the dense Swin computes with the masked tokens
left out of attention; its parameters are a dense Swin's, so a pretraining run fine-tunes as a Swin; partial
reconstruction and PR-MIM work on the unit grid; a run pretrains, evaluates and fine-tunes end to end.

The geometry is the Fashion-MNIST config's at tiny widths: 28 x 28 at patch 2, two stages (a shifted 14 x 14
stage in 2 x 2 windows of 7, then one 7 x 7 window), 4-pixel mask units on a 7 x 7 unit grid.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import mae_experiment

from prmim_jax import masking, methods
from prmim_jax.data import schema
from prmim_jax.methods import greenmim
from prmim_jax.models import classifier, swin, vit
from prmim_jax.models import greenmim as greenmim_lib

SIZES = dict(width=16, depths=(2, 2), num_heads=(2, 4), patch_size=2, window_size=7, image_size=28, channels=1)
ATOL = 2e-6  # float32: the same sums in another order


def tiny_model_config(**overrides):
    return greenmim_lib.model_config("T", **SIZES, decoder_width=16, decoder_num_heads=2, **overrides)


def images_and_units(batch=2, seed=0, visible=12):
    """Random images ``[batch, 28, 28, 1]`` and each image's own ``visible`` units of the 7 x 7 grid."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)).astype(np.float32))
    units = jnp.asarray(np.stack([rng.permutation(49)[:visible] for _ in range(batch)]).astype(np.int32))
    return images, units


@pytest.fixture(scope="module")
def encoder_and_params():
    encoder = greenmim_lib.build_greenmim(tiny_model_config()).encoder
    images, units = images_and_units()
    params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), images, units)["params"])
    # Non-zero biases and tables, so every parameter shapes the comparison.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    return encoder, params


def test_with_every_unit_visible_the_encoder_is_the_dense_swin_in_any_unit_order(encoder_and_params):
    encoder, params = encoder_and_params
    images, _ = images_and_units()
    dense = jax.jit(encoder.dense().apply)({"params": params}, images).features.reshape(2, 49, -1)
    order = jnp.asarray(np.stack([np.random.default_rng(s).permutation(49) for s in (1, 2)]).astype(np.int32))
    visible = jax.jit(encoder.apply)({"params": params}, images, order)
    np.testing.assert_allclose(visible, jnp.take_along_axis(dense, order[..., None], axis=1), atol=ATOL, rtol=0)


@flax.struct.dataclass
class KeyMaskedWindows(swin.ShiftedWindows):
    """The dense Swin's shifted windows with the masked tokens (``visible [B, H, W]`` False) removed as keys."""

    visible: jax.Array = None

    def attention_mask(self):
        keys = self.visible[..., None].astype(jnp.float32)
        if self.shift:
            keys = jnp.roll(keys, (-self.shift, -self.shift), axis=(1, 2))
        keys = swin.window_partition(keys, self.window)[..., 0]  # [B, nW, N]
        mask = jnp.where(keys[:, :, None, :] > 0, 0.0, -1e9)
        base = super().attention_mask()
        return mask if base is None else mask + base


class KeyMaskedSwin(nn.Module):
    """A dense Swin (the ``swin.SwinTransformer``'s parameters) whose attention ignores masked keys: the
    reference a visible-token encoder must equal at the visible units."""

    model: swin.SwinTransformer

    @nn.compact
    def __call__(self, images, visible_units):
        model = self.model
        stages = model.stages
        x = swin.embed_patches(vit.patchify(images, model.patch_size), model.width, model.dtype)
        for s, layout in enumerate(stages):
            side = 2 ** (len(stages) - 1 - s)  # a unit's side in this stage's tokens
            visible = jnp.repeat(jnp.repeat(visible_units, side, axis=1), side, axis=2)
            x = swin.SwinStage(layout, downsample=s < len(stages) - 1, name=f"stage_{s}")(
                x,
                windows_of=lambda shift, layout=layout, visible=visible: KeyMaskedWindows(
                    layout.grid, layout.window, shift, visible
                ),
            )
        return swin.final_norm(x, model.dtype)


def test_the_encoder_attends_like_the_dense_swin_with_the_masked_keys_left_out(encoder_and_params):
    encoder, params = encoder_and_params
    images, units = images_and_units(visible=12)  # a different set of 12 units in each image
    visible_grid = np.zeros((2, 49), bool)
    np.put_along_axis(visible_grid, np.asarray(units), True, axis=1)
    reference = jax.jit(KeyMaskedSwin(encoder.dense()).apply)(
        {"params": params}, images, jnp.asarray(visible_grid.reshape(2, 7, 7))
    )
    apply = jax.jit(encoder.apply)
    got = apply({"params": params}, images, units)
    np.testing.assert_allclose(got, jnp.take_along_axis(reference, units[..., None], axis=1), atol=ATOL, rtol=0)
    # Masked units change nothing: the encoder never reads their pixels.
    hidden = np.asarray(images).copy()
    hidden[~np.repeat(np.repeat(visible_grid.reshape(2, 7, 7), 4, 1), 4, 2)] = 0.0
    np.testing.assert_array_equal(got, apply({"params": params}, jnp.asarray(hidden), units))


def test_its_parameters_are_a_dense_swins_and_fine_tune_as_one(encoder_and_params):
    encoder, params = encoder_and_params
    dense = encoder.dense()
    images, _ = images_and_units()
    dense_params = jax.eval_shape(lambda: nn.unbox(dense.init(jax.random.key(0), images)["params"]))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, dense_params)
    # The fine-tuning classifier of the same sizes takes them as its encoder.
    model_config = classifier.swin_classifier_config("T", **SIZES, num_classes=10)
    fine_tune = classifier.build_classifier(model_config)
    fresh = jax.eval_shape(lambda: nn.unbox(fine_tune.init(jax.random.key(0), images)["params"]))
    assert jax.tree.map(jnp.shape, fresh["encoder"]) == jax.tree.map(jnp.shape, params)


def tiny_experiment(**method_overrides) -> ml_collections.ConfigDict:
    config = mae_experiment()
    config.model = tiny_model_config()
    config.data = schema.data_config(source="fashion_mnist")
    config.method = greenmim.default_config(**method_overrides)
    return config


def test_pr_mim_predicts_every_masked_unit_and_partial_only_the_decoded_ones():
    assert methods.build(tiny_experiment(reconstruction="partial")).model.aggregation_kernel == 0
    method = methods.build(tiny_experiment(reconstruction="progressive", kernel_size=3))
    assert method.layout.grid == (7, 7) and method.model.patch_size == 4  # 4-pixel units, as 32 at 224
    rng = np.random.default_rng(0)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(2)]))
    assert ids.visible.shape == (2, 12) and ids.decoded.shape[1] + ids.thrown.shape[1] == 37
    assert ids.thrown.shape[1] == 24  # rho_d = 0.5 of the 49 units (rho_d counts all tokens)
    batch = method.example_batch(2) | dict(ids_visible=ids.visible, ids_decoded=ids.decoded, ids_thrown=ids.thrown)
    batch["images"] = rng.normal(size=batch["images"].shape).astype(np.float32)
    params = nn.unbox(jax.jit(method.init)(jax.random.key(0), batch).params)
    output = jax.jit(method.predict)(params, batch["images"], ids)
    assert output.pred_decoded.shape == (2, 13, 16) and output.pred_thrown.shape == (2, 24, 16)
    grads = jax.jit(jax.grad(lambda p: method.loss(methods.Variables(p), batch, None)[0]))(params)
    assert all(np.any(g) for g in jax.tree.leaves(grads["aggregation"]))


def test_a_kernel_larger_than_the_unit_grid_and_amt_without_a_cls_token_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"kernel_size=9 .*7x7"):
        methods.build(tiny_experiment(reconstruction="progressive", kernel_size=9))
    with pytest.raises(ValueError, match=r"sampler='amt' reads a ViT's cls attention.*use 'furthest'"):
        methods.build(tiny_experiment(reconstruction="progressive", sampler="amt"))
