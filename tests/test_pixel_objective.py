"""Patchify order, norm-pix targets and the masked mean squared error."""

import jax.numpy as jnp
import numpy as np
import pytest

from prmim_jax import masking
from prmim_jax.models import mae, vit


def official_patchify(images_nchw: np.ndarray, p: int) -> np.ndarray:
    """The official MAE's patchify, written from its description: 'nchpwq->nhwpqc'."""
    n, c, h, w = images_nchw.shape
    x = images_nchw.reshape(n, c, h // p, p, w // p, p)
    return np.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


@pytest.mark.parametrize("channels, size, patch", [(3, 8, 4), (1, 28, 2), (2, 12, 3)])
def test_patchify_uses_the_official_pqc_order(channels, size, patch):
    images = np.random.default_rng(0).normal(size=(2, channels, size, size)).astype(np.float32)
    ours = vit.patchify(jnp.asarray(images.transpose(0, 2, 3, 1)), patch)
    np.testing.assert_array_equal(np.asarray(ours), official_patchify(images, patch))


def test_unpatchify_inverts_patchify_on_a_non_square_image():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12, 3)))
    patches = vit.patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(np.asarray(vit.unpatchify(patches, 4, (2, 3))), np.asarray(images))


def test_patchify_rejects_an_image_that_is_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vit.patchify(jnp.zeros((1, 10, 8, 3)), 4)


def test_norm_pix_targets_use_unbiased_variance():
    images = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype(np.float32)
    targets = np.asarray(mae.pixel_targets(jnp.asarray(images), 2, norm_pix=True))
    patches = official_patchify(images.transpose(0, 3, 1, 2), 2)
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(targets, (patches - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-6)
    # ddof=1 makes each normalised patch's sum of squares P - 1 (ddof=0 would give P).
    np.testing.assert_allclose(np.square(targets).sum(-1), patches.shape[-1] - 1, rtol=1e-4)


def test_raw_pixel_targets_are_the_patches():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 1)))
    np.testing.assert_allclose(
        np.asarray(mae.pixel_targets(images, 2, norm_pix=False)), np.asarray(vit.patchify(images, 2)), rtol=1e-6
    )


def test_mae_loss_is_the_mean_over_masked_tokens_only():
    rng = np.random.default_rng(0)
    layout = masking.TokenLayout((2, 2), mask_ratio=0.5)
    images = jnp.asarray(rng.normal(size=(3, 4, 4, 1)).astype(np.float32))
    ids = masking.random_masking(rng.uniform(size=(3, 4)), layout)
    targets = np.asarray(mae.pixel_targets(images, 2))
    pred = rng.normal(size=(3, 2, 4)).astype(np.float32)
    output = mae.MAEOutput(latent=None, pred_decoded=jnp.asarray(pred), pred_thrown=None)
    loss = float(mae.reconstruction_loss(images, output, ids.decoded, ids.thrown, 2))

    mask = np.zeros((3, 4))
    np.put_along_axis(mask, ids.decoded, 1.0, axis=1)
    full_pred = np.zeros_like(targets)
    np.put_along_axis(full_pred, ids.decoded[..., None], pred, axis=1)
    per_token = np.square(full_pred - targets).mean(-1)
    np.testing.assert_allclose(loss, (per_token * mask).sum() / mask.sum(), rtol=1e-6)
