"""Progressive reconstruction: the aggregation is a depth-wise convolution read at the thrown tokens,
it costs O(N_thr k^2 C), thrown tokens are supervised through it, and with nothing thrown PR-MIM is MAE."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from prmim_jax import masking, methods, optim, runs, train_step
from prmim_jax.methods import mae as mae_family
from prmim_jax.models import aggregate, mae, vit


def reference_depthwise_conv(grid_nhwc, kernel, bias):
    """A full-grid depth-wise convolution with zero padding: ``[B, H, W, C]``, kernel ``[k, k, C]``."""
    channels = grid_nhwc.shape[-1]
    out = jax.lax.conv_general_dilated(
        grid_nhwc,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out + bias


@pytest.mark.parametrize("grid, kernel_size", [((6, 6), 3), ((7, 9), 7), ((14, 14), 7)])
def test_aggregation_equals_a_depthwise_convolution_at_the_thrown_tokens(grid, kernel_size):
    layout = masking.TokenLayout(grid, 0.75, 0.5)
    rng = np.random.default_rng(0)
    ids = masking.sample("random_throw", np.stack([masking.draw_noise(rng, layout) for _ in range(3)]), layout)
    present = np.concatenate([ids.visible, ids.decoded], 1)
    width = 8
    features = jnp.asarray(rng.normal(size=(3, present.shape[1], width)).astype(np.float32))
    module = aggregate.ProgressiveAggregation(grid, kernel_size)
    variables = nn.unbox(module.init(jax.random.key(0), features, present, ids.thrown))

    def ours(variables, features):
        return module.apply(variables, features, present, ids.thrown)

    def reference(variables, features):
        # the paper's recipe: scatter onto the grid, zeros at thrown positions, convolve, read the thrown ones
        rows = np.arange(3)[:, None]
        grid_tokens = jnp.zeros((3, layout.num_tokens, width)).at[rows, present].set(features)
        p = variables["params"]
        out = reference_depthwise_conv(grid_tokens.reshape(3, *grid, width), p["kernel"], p["bias"])
        return out.reshape(3, -1, width)[rows, ids.thrown]

    np.testing.assert_allclose(ours(variables, features), reference(variables, features), rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=(3, layout.num_thrown, width)).astype(np.float32))
    grads = [
        jax.grad(lambda v, f, fn=fn: jnp.sum(fn(v, f) * cotangent), argnums=(0, 1))(variables, features)
        for fn in (ours, reference)
    ]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def build(method_name, throw_ratio, sampler="random_throw", **model_overrides):
    method_cfg = methods.method_config(
        method_name, throw_ratio=throw_ratio, sampler=sampler if throw_ratio else "random"
    )
    method = mae_family.from_sections(tiny_model_config(**model_overrides), method_cfg)
    return method.model, method


def batch_for(method, seed=0, batch=4):
    rng = np.random.default_rng(seed)
    noise = np.stack([masking.draw_noise(rng, method.layout) for _ in range(batch)])
    images = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)).astype(np.float32))
    return images, method.sample(noise)


def test_with_nothing_thrown_prmim_is_mae_bit_for_bit():
    _, mae_method = build("mae", 0.0)
    pr_model, pr_method = build("prmim", 0.0)
    images, ids = batch_for(mae_method)
    pr_params = nn.unbox(pr_model.init(jax.random.key(0), images, *ids))["params"]
    shared = {k: v for k, v in pr_params.items() if k != "aggregation"}
    mae_loss, mae_grads = jax.jit(jax.value_and_grad(lambda p: mae_method.objective(p, images, ids)))(shared)
    pr_loss, pr_grads = jax.jit(jax.value_and_grad(lambda p: pr_method.objective(p, images, ids)))(pr_params)
    assert float(pr_loss) == float(mae_loss)
    for a, b in zip(
        jax.tree_util.tree_leaves(mae_grads), jax.tree_util.tree_leaves({k: pr_grads[k] for k in shared}), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(pr_grads["aggregation"]))


def target_influence(model, method, params, images, ids):
    """``[B, N]`` bool: which tokens' target pixels the loss depends on (the model input held fixed)."""
    output = model.apply({"params": params}, images, *ids)

    def loss_of_targets(target_images):
        return mae.reconstruction_loss(
            target_images, output, ids.decoded, ids.thrown, 2, method.norm_pix_loss, method.throwing.thrown_loss_weight
        )

    grads = jax.jit(jax.grad(loss_of_targets))(images)
    return np.abs(np.asarray(vit.patchify(grads, 2))).sum(-1) > 0


@pytest.mark.parametrize("method_name", ["partial", "prmim"])
def test_which_tokens_are_supervised(method_name):
    model, method = build(method_name, 0.5)
    images, ids = batch_for(method)
    params = nn.unbox(model.init(jax.random.key(0), images, *ids))["params"]
    supervised = target_influence(model, method, params, images, ids)
    rows = np.arange(4)[:, None]
    assert not supervised[rows, ids.visible].any(), "visible tokens never enter the loss"
    assert supervised[rows, ids.decoded].all()
    assert supervised[rows, ids.thrown].all() == (method_name == "prmim")
    assert not supervised[rows, ids.thrown].any() or method_name == "prmim"


def test_thrown_tokens_send_gradient_through_the_aggregation_to_the_decoder():
    model, method = build("prmim", 0.5)
    images, ids = batch_for(method)
    params = nn.unbox(model.init(jax.random.key(0), images, *ids))["params"]

    def thrown_only_loss(params):
        output = model.apply({"params": params}, images, *ids)
        targets = mae.pixel_targets(images, 2)
        return jnp.mean(mae.token_mse(targets, output.pred_thrown, ids.thrown))

    grads = jax.jit(jax.grad(thrown_only_loss))(params)
    for name in ("aggregation", "decoder", "encoder", "decoder_norm", "pred"):
        assert any(np.any(g) for g in jax.tree_util.tree_leaves(grads[name])), name


def test_thrown_loss_weight_weighs_thrown_against_decoded_tokens():
    model, method = build("prmim", 0.5)
    images, ids = batch_for(method)
    params = nn.unbox(model.init(jax.random.key(0), images, *ids))["params"]
    output = model.apply({"params": params}, images, *ids)
    targets = mae.pixel_targets(images, 2)
    dec = mae.token_mse(targets, output.pred_decoded, ids.decoded)
    thr = mae.token_mse(targets, output.pred_thrown, ids.thrown)
    for weight in (1.0, 0.5):
        loss = mae.reconstruction_loss(images, output, ids.decoded, ids.thrown, 2, True, weight)
        expected = (dec.sum() + weight * thr.sum()) / (dec.size + weight * thr.size)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)


def make_batch(images, ids):
    return {"images": images, "ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}


def jit_step(method):
    return jax.jit(functools.partial(train_step.train_step, method=method))


def compiled_step(model, method, images, ids):
    tx = optim.build_optimizer(optim.optimizer_config(), global_batch=images.shape[0], total_steps=10)
    state = nn.unbox(runs.init_state(method, tx, jax.random.key(0), images.shape[0]))
    return jit_step(method).lower(state, make_batch(images, ids), jax.random.key(0)).compile()


def test_the_compiled_prmim_step_costs_o_n_k2_c_more_than_partial():
    width, kernel = 16, 7
    pr_model, pr_method = build("prmim", 0.5, decoder_width=width)
    partial_model, partial_method = build("partial", 0.5, decoder_width=width)
    images, ids = batch_for(pr_method)
    pr_step = compiled_step(pr_model, pr_method, images, ids)
    partial_step = compiled_step(partial_model, partial_method, images, ids)
    assert " convolution(" not in pr_step.as_text()  # no grouped convolution, so no dense C x C kernel gradient
    extra = pr_step.cost_analysis()["flops"] - partial_step.cost_analysis()["flops"]
    batch, layout = images.shape[0], pr_method.layout
    # The aggregation's forward and two backward products over the grid, the head on the thrown
    # tokens (forward, two backward products), their norms and losses. XLA's own kernel gradient of a
    # grouped convolution would add a dense C x C convolution, 2 k^2 C^2 per grid token.
    aggregation = batch * layout.num_tokens * 3 * 2 * kernel**2 * width
    head = batch * layout.num_thrown * (3 * 2 * width * pr_model.patch_dim + 100 * (width + pr_model.patch_dim))
    assert 0.5 * aggregation < extra < aggregation + head, (extra, aggregation, head)
    dense_kernel_gradient = batch * layout.num_tokens * 2 * kernel**2 * width**2
    assert extra < dense_kernel_gradient / 2


def test_training_steps_lower_the_prmim_loss():
    _, method = build("prmim", 0.5, sampler="furthest")
    images, ids = batch_for(method, batch=8)
    tx = optim.build_optimizer(optim.optimizer_config(base_lr=2e-2), global_batch=256, total_steps=100)
    state = nn.unbox(runs.init_state(method, tx, jax.random.key(0), images.shape[0]))
    step = jit_step(method)
    batch = make_batch(images, ids)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses
