"""Mixed precision, the attention implementation rule and rematerialisation (``prmim_jax.models.vit``'s policy).

What a user relies on: bfloat16 training follows float32 training closely with
float32 parameters and optimizer state; ``attention_impl`` never picks a kernel
that cannot run, and asking for one is an error that names the fix before
anything compiles; ``remat`` changes memory, never the gradient.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from prmim_jax import masking, methods, optim, runs, train_step
from prmim_jax.methods import mae as mae_method
from prmim_jax.models import attention as attention_lib
from prmim_jax.models import classifier, mae, vit

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


# --- attention implementation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, head_dim, backend, capability, requested, expected",
    [
        # auto (None or 'auto'): cuDNN on a CUDA GPU in half precision with a supported head width ...
        (BF16, 64, "gpu", (9, 0), None, "cudnn"),  # ViT-B's encoder
        (BF16, 32, "gpu", (9, 0), "auto", "cudnn"),  # MAE's decoder (512 / 16)
        (F16, 64, "gpu", (8, 0), "auto", "cudnn"),
        (BF16, 64, "gpu", None, "auto", "cudnn"),  # capability unknown: not held against cuDNN
        # ... and XLA everywhere else.
        (F32, 64, "gpu", (9, 0), "auto", "xla"),
        (BF16, 64, "cpu", None, "auto", "xla"),
        (BF16, 64, "tpu", None, None, "xla"),
        (BF16, 60, "gpu", (9, 0), "auto", "xla"),  # not a multiple of 8
        (BF16, 256, "gpu", (9, 0), "auto", "xla"),  # wider than 128
        (BF16, 64, "gpu", (7, 5), "auto", "xla"),  # pre-Ampere GPU
        # explicit choices
        (F32, 64, "cpu", None, "xla", "xla"),
        (BF16, 64, "gpu", (9, 0), "xla", "xla"),
        (BF16, 64, "gpu", (9, 0), "cudnn", "cudnn"),
    ],
)
def test_attention_implementation_table(dtype, head_dim, backend, capability, requested, expected):
    assert attention_lib.attention_implementation(dtype, head_dim, backend, requested, capability) == expected


def test_attention_with_a_bias_on_an_odd_length_sequence_stays_on_xla():
    # cuDNN's training kernel needs even lengths with an additive bias (SimMIM's 1 + 196 tokens).
    assert attention_lib.attention_implementation(BF16, 64, "gpu", "auto", (9, 0), odd_length_bias=True) == "xla"


def refusing_cudnn(monkeypatch, refused: list):
    """Makes jax.nn.dot_product_attention refuse cuDNN as jax's own shape check does (NotImplementedError)."""
    xla_attention = jax.nn.dot_product_attention

    def attention(query, key, value, bias=None, *, implementation=None):
        if implementation == "cudnn":
            refused.append(query.shape)
            raise NotImplementedError(f"Unsupported sequence length Q {query.shape[1]}, KV {key.shape[1]}.")
        return xla_attention(query, key, value, bias, implementation=implementation)

    monkeypatch.setattr(jax.nn, "dot_product_attention", attention)


def test_auto_attention_runs_on_xla_where_jaxs_cudnn_refuses_the_shapes_even_under_grad(monkeypatch):
    # jax 0.11.2 on an H200 refused MAE's 197-token decoder when differentiating; 'auto' must still train.
    refused = []
    refusing_cudnn(monkeypatch, refused)
    query, key, value = (jax.random.normal(jax.random.key(i), (2, 197, 4, 8)) for i in range(3))

    def loss(query, implementation, insist):
        return jnp.sum(attention_lib.fused_attention(query, key, value, None, implementation, insist) ** 2)

    expected = jax.value_and_grad(loss)(query, "xla", False)
    got = jax.value_and_grad(loss)(query, "cudnn", False)
    assert refused, "the cuDNN kernel was never asked"
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_explicit_cudnn_attention_that_jax_refuses_is_jaxs_error_not_a_silent_fallback(monkeypatch):
    refusing_cudnn(monkeypatch, [])
    query = jnp.ones((2, 197, 4, 8))
    with pytest.raises(NotImplementedError, match="Unsupported sequence length Q 197"):
        attention_lib.fused_attention(query, query, query, None, "cudnn", True)


@pytest.mark.parametrize(
    "dtype, head_dim, backend, capability, reason",
    [
        (BF16, 64, "cpu", None, "needs a CUDA GPU"),
        (F32, 64, "gpu", (9, 0), "set dtype='bfloat16'"),
        (BF16, 60, "gpu", (9, 0), "change width or num_heads"),
        (BF16, 64, "gpu", (7, 0), "compute capability 8.0"),
    ],
)
def test_cudnn_where_it_cannot_run_is_an_error_naming_the_fix(dtype, head_dim, backend, capability, reason):
    with pytest.raises(ValueError, match=reason) as error:
        attention_lib.attention_implementation(dtype, head_dim, backend, "cudnn", capability)
    assert "attention_impl='xla'" in str(error.value)


def test_building_a_model_with_impossible_options_fails_before_compiling():
    # float32 rules cuDNN out on every backend.
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run"):
        mae.build_mae(tiny_model_config(attention_impl="cudnn"))
    with pytest.raises(ValueError, match="choose one of"):
        mae.build_mae(tiny_model_config(attention_impl="flash"))
    with pytest.raises(ValueError, match=r"remat='some'; choose one of \('none', 'dots_saveable', 'full'\)"):
        mae.build_mae(tiny_model_config(remat="some"))
    with pytest.raises(ValueError, match="remat='some'; choose one of"):
        classifier.build_classifier(classifier.classifier_config("Ti/16", depth=1, num_classes=10, remat="some"))
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run"):
        classifier.build_classifier(
            classifier.classifier_config("Ti/16", depth=1, num_classes=10, attention_impl="cudnn")
        )


@pytest.mark.parametrize("bias_shape", [None, (3, 7, 7), (2, 3, 7, 7), (1, 3, 7, 7)], ids=str)
def test_cpu_attention_computes_jax_attention_and_its_gradient(bias_shape):
    rng = np.random.default_rng(0)
    query, key, value, cotangent = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), F32) for _ in range(4))
    bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), F32)

    def loss(attention, *args):
        return jnp.sum(attention(*args) * cotangent)

    args = (query, key, value) if bias is None else (query, key, value, bias)
    argnums = tuple(range(1, len(args) + 1))
    expected = jax.grad(loss, argnums)(jax.nn.dot_product_attention, *args)
    actual = jax.grad(loss, argnums)(attention_lib.cpu_attention, *args)
    np.testing.assert_allclose(attention_lib.cpu_attention(*args), jax.nn.dot_product_attention(*args), atol=1e-6)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_residual_boundary_is_the_identity_and_lets_the_gradient_through():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)), F32)
    np.testing.assert_array_equal(vit.residual_boundary(x), x)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(vit.residual_boundary(jnp.cos(x))))))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(jnp.sin(jnp.cos(x))))(x), rtol=1e-6)


def largest_fusion_of_transformer_gradient(depth: int) -> int:
    """Operands of the largest fusion in XLA CPU's compiled gradient of a ``depth``-block transformer."""
    model = vit.Transformer(depth, num_heads=2, mlp_dim=64, final_norm=False)
    x = jnp.zeros((2, 5, 16))
    params = model.init(jax.random.key(0), x)
    hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2))).lower(params, x).compile().as_text()
    return max(
        line.split("fusion(", 1)[1].split(")", 1)[0].count("%") for line in hlo.splitlines() if " fusion(" in line
    )


def test_cpu_backward_computes_the_residual_gradient_once_per_block():
    # Without the boundary XLA CPU fused the residual-gradient chain of every later block into each
    # block's weight-gradient fusions, so their size (and the step's time) grew with depth: at
    # ViT-B/16 one fusion read 128 arrays, and these fusions took a third of the MAE step.
    assert largest_fusion_of_transformer_gradient(8) <= largest_fusion_of_transformer_gradient(2)


# --- precision policy --------------------------------------------------------------------------


def test_bfloat16_keeps_the_residual_stream_and_heads_in_float32(tiny_batch, tiny_params):
    images, ids = tiny_batch
    model = mae.build_mae(tiny_model_config(dtype="bfloat16"))
    out, state = model.apply(
        {"params": tiny_params}, images, ids.visible, ids.decoded, capture_intermediates=True, mutable=["intermediates"]
    )
    captured = state["intermediates"]
    block = captured["encoder"]["transformer"]["block_0"]
    assert block["__call__"][0].dtype == F32  # the residual stream
    assert block["mlp"]["fc1"]["__call__"][0].dtype == BF16  # matmuls
    assert block["norm1"]["__call__"][0].dtype == BF16  # norms emit the matmul dtype
    assert captured["decoder"]["__call__"][0].dtype == F32
    assert out.latent.dtype == BF16 and out.pred_decoded.dtype == F32

    classify = classifier.build_classifier(
        classifier.classifier_config(
            "Ti/16", width=32, depth=1, num_heads=4, image_size=32, num_classes=10, dtype="bfloat16"
        )
    )
    variables = classify.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {F32}
    assert classify.apply(variables, jnp.zeros((2, 32, 32, 3))).dtype == F32


def train_losses(dtype: str, steps: int, batch_size: int = 8, seed: int = 0):
    """Losses of ``steps`` MAE steps of the tiny model on fixed synthetic images, and the final train state.

    The one place this test uses the training API (``methods.mae.from_sections``,
    ``runs.init_state``, ``train_step.train_step``).
    """
    method = mae_method.from_sections(
        tiny_model_config(dtype=dtype),
        methods.method_config("mae"),
        optimizer=optim.optimizer_config(base_lr=1e-3, warmup_steps=10),
    )
    tx = method.optimizer(batch_size, steps)
    state = nn.unbox(runs.init_state(method, tx, jax.random.key(seed), batch_size))
    step = jax.jit(functools.partial(train_step.train_step, method=method))
    images = smooth_images(np.random.default_rng(seed), batch_size)
    noise_rng = np.random.default_rng(seed + 1)  # the same masks in every run
    losses = []
    for i in range(steps):
        ids = method.sample(np.stack([masking.draw_noise(noise_rng, method.layout) for _ in range(batch_size)]))
        batch = {"images": images, "ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def smooth_images(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """``[B, 28, 28, 1] float32``: random sums of low-frequency waves, which a masked autoencoder can learn to fill in."""
    coords = np.linspace(0, 1, 28)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    freq = rng.uniform(0.5, 3, size=(batch_size, 3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(batch_size, 3))
    waves = np.sin(2 * np.pi * (freq[..., :1, None] * rows + freq[..., 1:, None] * cols) + phase[..., None, None])
    return waves.sum(axis=1)[..., None].astype(np.float32)


# Measured over these 100 steps: bfloat16's loss is within 0.73% of float32's at every step
# (median 0.31%, last ten steps 0.28%) while both fall by a third. One bfloat16 rounding is 0.4%
# relative (8-bit mantissa); the tolerances give the two trajectories four times the measured room
# to drift apart and stay a tenth of the learning signal.
LOSS_CURVE_RTOL = 0.03
LOSS_TAIL_RTOL = 0.01


def test_bfloat16_training_follows_float32_with_float32_params_and_optimizer_state():
    losses32, _ = train_losses("float32", steps=100)
    losses16, state16 = train_losses("bfloat16", steps=100)
    assert losses32[-10:].mean() < 0.8 * losses32[:10].mean()  # the run learns something to compare
    np.testing.assert_allclose(losses16, losses32, rtol=LOSS_CURVE_RTOL)
    np.testing.assert_allclose(losses16[-10:].mean(), losses32[-10:].mean(), rtol=LOSS_TAIL_RTOL)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((state16.params, state16.opt_state))} - {
        jnp.dtype(jnp.int32)  # the step counters
    } == {F32}


# --- rematerialisation -------------------------------------------------------------------------


def remat_grad_fn(remat: str, **overrides):
    """``(jitted gradient of the MAE loss w.r.t. params, params)`` of the tiny model with ``remat`` and ``overrides``."""
    model = mae.build_mae(tiny_model_config(remat=remat, **overrides))
    layout = masking.TokenLayout(model.grid, 0.75)
    rng = np.random.default_rng(0)
    images = jnp.asarray(smooth_images(rng, 4))
    ids = masking.random_masking(rng.uniform(size=(4, layout.num_tokens)), layout)
    params = nn.unbox(model.init(jax.random.key(0), images, ids.visible, ids.decoded))["params"]

    def loss(params):
        output = model.apply({"params": params}, images, ids.visible, ids.decoded)
        return mae.reconstruction_loss(images, output, ids.decoded, ids.thrown, model.patch_size)

    return jax.jit(jax.grad(loss)), params


# Rematerialisation recomputes the same float32 operations, but XLA may fuse the recomputed
# ones differently, so results agree to float32 rounding (measured: at most 1.5e-8 absolute).
REMAT_GRAD_ATOL = 1e-6


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_rematerialisation_leaves_the_gradient_unchanged(remat):
    grad_none, params = remat_grad_fn("none")
    grad_remat, _ = remat_grad_fn(remat)
    expected, actual = grad_none(params), grad_remat(params)
    for want, got in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(actual), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=REMAT_GRAD_ATOL)


def saved_residual_bytes(remat: str) -> int:
    """Bytes a transformer's backward pass keeps from its forward pass (``jax.vjp``'s residuals) under ``remat``."""
    model = vit.Transformer(4, num_heads=4, mlp_dim=512, final_norm=False, remat=remat)
    x = jnp.zeros((8, 197, 128))  # MAE's decoder sequence at a small width
    params = model.init(jax.random.key(0), x)
    residuals = jax.eval_shape(lambda p, x: jax.vjp(lambda p, x: jnp.sum(model.apply(p, x)), p, x)[1], params, x)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(residuals))


def test_rematerialisation_keeps_less_for_the_backward_pass():
    # What remat controls on every backend. (XLA CPU's compiled temporary memory barely moves with it,
    # measured 200 / 197 / 198 MiB at batch 8, width 128, 8 blocks; accelerators turn it into memory.)
    kept = {remat: saved_residual_bytes(remat) for remat in vit.REMAT_POLICIES}
    assert kept["full"] < 0.1 * kept["none"]
    assert kept["full"] < kept["dots_saveable"] < 0.6 * kept["none"]
