"""LocalMIM, its partial and PR-MIM variants, and its multi-scale HOG targets.

The HOG targets are checked against a numpy implementation written from the
description (Sobel with reflect padding, 9 unsigned orientation bins weighted
by magnitude, cell means, L2 norm over the bins), and the whole loss of each
variant against a PyTorch (CPU, float64) forward pass written from the
official LocalMIM model (Haoqing-Wang/LocalMIM, ``ViT/models_mim.py``): the
encoder over the visible tokens, a LayerNorm per tapped block, decoders over
the whole grid in grid order with mask tokens, ``ConvTranspose2d`` /
``AvgPool2d`` heads, and ``recal_mask``. The thrown tokens enter the
reference as keys masked out of the decoder's attention, so its outputs at the
other tokens are those of a decoder that never sees them.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prmim_jax import masking, methods, optim
from prmim_jax.data import schema
from prmim_jax.models import layers, localmim, vit
from prmim_jax.targets import hog

LOSS_ATOL = 1e-6  # measured: 4e-8 to 7e-8 on losses of about 2
HOG_ATOL = 1e-6  # measured: 1.3e-7 at most


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


# ---------------------------------------------------------------- HOG against numpy


def numpy_hog(images: np.ndarray, cell: int, bins: int = 9) -> np.ndarray:
    """``[B, H, W, C]`` -> ``[B, H / cell, W / cell, C * bins]`` float64, from the description."""
    batch, height, width, channels = images.shape
    horizontal = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)  # left minus right
    vertical = horizontal.T  # top minus bottom
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    per_channel = []
    for c in range(channels):
        padded = np.pad(images[..., c].astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
        g_h = sum(horizontal[i, j] * padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3))
        g_v = sum(vertical[i, j] * padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3))
        angle = np.mod(np.arctan2(g_h, g_v), np.pi)  # unsigned: [0, pi)
        bin_of = np.minimum((angle / (np.pi / bins)).astype(int), bins - 1)
        histograms = np.zeros((batch, height // cell, width // cell, bins))
        for b in range(batch):
            np.add.at(histograms[b], (rows // cell, cols // cell, bin_of[b]), np.hypot(g_h[b], g_v[b]))
        histograms /= cell * cell
        norms = np.linalg.norm(histograms, axis=-1, keepdims=True)
        per_channel.append(histograms / np.maximum(norms, 1e-12))
    return np.concatenate(per_channel, axis=-1)


def test_hog_matches_an_independent_numpy_implementation_at_every_scale():
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    cells = (1, 4, 8, 16, 32)  # ViT-B/16's cells on a 32-pixel image, and single pixels
    ours = jax.jit(hog.multiscale_hog, static_argnums=1)(jnp.asarray(images), cells)
    for cell, features in zip(cells, ours, strict=True):
        assert features.shape == (2, 32 // cell, 32 // cell, 27) and features.dtype == jnp.float32
        np.testing.assert_allclose(features, numpy_hog(images, cell), rtol=0, atol=HOG_ATOL)


def test_hog_histograms_are_unit_length_and_blind_to_brightness_and_gradient_sign():
    images = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 16, 3)).astype(np.float32))
    hog_4 = jax.jit(lambda x: hog.hog(x, 4))
    features = hog_4(images)
    np.testing.assert_allclose(jnp.linalg.norm(features.reshape(1, 4, 4, 3, 9), axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(hog_4(2.0 * images + 5.0), features, atol=1e-5)
    np.testing.assert_allclose(hog_4(-images), features, atol=1e-5)  # unsigned orientations
    np.testing.assert_array_equal(hog_4(jnp.ones_like(images)), 0.0)  # no gradient, no orientation


# ---------------------------------------------------------------- the loss against PyTorch


@dataclasses.dataclass(frozen=True)
class Arch:
    """A 16x16 RGB image, patch 4: a 4x4 token grid, and the four heads of ViT-B (HOG cells 1, 2, 4, 8 px)."""

    image_size: int = 16
    patch_size: int = 4
    width: int = 32
    depth: int = 4
    heads: int = 4
    decoder_width: int = 16
    decoder_heads: int = 2
    batch: int = 2
    throw_ratio: float = 0.5
    kernel_size: int = 3

    @property
    def grid(self):
        return (self.image_size // self.patch_size,) * 2

    def model_config(self):
        return localmim.model_config(
            "B/16",
            width=self.width,
            depth=self.depth,
            num_heads=self.heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            tap_blocks=(1, 2, 3, 4),
            decoder_width=self.decoder_width,
            decoder_num_heads=self.decoder_heads,
        )


ARCH = Arch()


def build_method(reconstruction, model_config=None, **overrides):
    throw = dict(throw_ratio=ARCH.throw_ratio, kernel_size=ARCH.kernel_size) if reconstruction != "full" else {}
    section = methods.method_config("localmim", reconstruction=reconstruction, **(throw | overrides))
    config = ml_collections.ConfigDict(
        dict(
            model=model_config or ARCH.model_config(),
            method=section,
            optimizer=optim.optimizer_config(),
            data=schema.data_config(),
        )
    )
    return methods.build(config)


def random_batch(method, seed=0):
    rng = np.random.default_rng(seed)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(ARCH.batch)]))
    shape = (ARCH.batch, ARCH.image_size, ARCH.image_size, 3)
    return {
        "images": rng.normal(size=shape).astype(np.float32),
        "ids_visible": ids.visible,
        "ids_decoded": ids.decoded,
        "ids_thrown": ids.thrown,
    }


def random_params(method, batch, seed=2):
    """Random values in the shapes of ``method.init`` (traced, never compiled): kernels ~ N(0, 1 / fan-in),
    LayerNorm scales ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2), tokens ~ N(0, 0.5^2)."""
    shapes = nn.unbox(jax.eval_shape(method.init, jax.random.key(0), batch).params)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = layers.path_names(path)[-1]
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "scale":
            return 1.0 + 0.2 * noise
        if name == "bias":
            return 0.1 * noise
        if name.endswith("_token"):
            return 0.5 * noise
        return noise / np.sqrt(leaf.size // leaf.shape[-1])

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def progressive_setup():
    """The PR-MIM method, a batch, and random parameters."""
    method = build_method("progressive")
    batch = random_batch(method)
    return method, batch, random_params(method, batch)


@pytest.fixture(scope="module")
def progressive_loss(progressive_setup):
    """The PR-MIM method's ``params -> (loss, metrics)`` on ``progressive_setup``'s batch, compiled once."""
    method, batch, _ = progressive_setup
    return jax.jit(lambda params: method.loss(methods.Variables(params), batch, None)[:2])


def without_aggregation(params):
    return {
        k: ({n: v for n, v in level.items() if n != "aggregation"} if k.startswith("level_") else level)
        for k, level in params.items()
    }


def t(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def torch_layer_norm(x, p):
    return F.layer_norm(x, (x.shape[-1],), t(p["scale"]), t(p["bias"]), eps=1e-6)


def torch_block(x, p, key_bias=None):
    """timm's pre-norm ViT block (the official models' ``Block``) with our parameters; ``key_bias [B, T]``."""
    h = torch_layer_norm(x, p["norm1"])
    q, k, v = (
        torch.einsum("btd,dhk->bhtk", h, t(p["attn"][n]["kernel"])) + t(p["attn"][n]["bias"])[:, None]
        for n in ("query", "key", "value")
    )
    logits = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    attended = torch.einsum("bhtk,hkd->btd", logits.softmax(-1) @ v, t(p["attn"]["out"]["kernel"]))
    x = x + attended + t(p["attn"]["out"]["bias"])
    h = torch_layer_norm(x, p["norm2"])
    h = F.gelu(h @ t(p["mlp"]["fc1"]["kernel"]) + t(p["mlp"]["fc1"]["bias"]))
    return x + h @ t(p["mlp"]["fc2"]["kernel"]) + t(p["mlp"]["fc2"]["bias"])


def torch_head(grid_nchw, p, scale):
    """The official ``MAE_Decoder.pred`` for ``scale``, in NCHW with PyTorch's layers."""

    def up(x, q):  # our kernel [2, 2, C_in, C_out] is PyTorch's ConvTranspose2d weight [C_in, C_out, 2, 2]
        return F.conv_transpose2d(x, t(q["kernel"]).permute(2, 3, 0, 1), t(q["bias"]), stride=2)

    x = grid_nchw
    if scale == 4:
        x = up(x, p["up_0"])
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # the official channels-first LayerNorm
        x = (x - mean) / torch.sqrt(var + 1e-6) * t(p["norm"]["scale"])[:, None, None] + t(p["norm"]["bias"])[
            :, None, None
        ]
        x = up(F.gelu(x), p["up_1"])
    elif scale == 2:
        x = up(x, p["up_0"])
    elif scale == 0.5:
        x = F.avg_pool2d(x, 2, 2)
    weight = t(p["pred"]["kernel"]).T[:, :, None, None]
    return F.conv2d(x, weight, t(p["pred"]["bias"]))


def recal_mask(mask, grid, scale):
    """The official ``recal_mask``: ``[B, N]`` -> ``[B, (g * s)^2]``, repeated (s >= 1) or 2x2 means (s = 0.5)."""
    m = mask.reshape(mask.shape[0], *grid)
    if scale >= 1:
        s = int(scale)
        m = m.repeat_interleave(s, 1).repeat_interleave(s, 2)
    else:
        m = F.avg_pool2d(m[:, None], 2, 2)[:, 0]
    return m.reshape(m.shape[0], -1)


def torch_latents(params, batch, tap_blocks=(1, 2, 3, 4)):
    """The official encoder over the visible tokens: one ``[B, 1 + N_vis, D]`` per tapped block, after its norm."""
    images, ids_visible = batch["images"].astype(np.float64), batch["ids_visible"]
    size, p, grid = ARCH.batch, ARCH.patch_size, ARCH.grid
    rows = np.arange(size)[:, None]
    enc = params["encoder"]
    patches = torch.from_numpy(np.asarray(vit.patchify(images, p), np.float64))
    x = patches @ t(enc["patch_embed"]["kernel"]) + t(enc["patch_embed"]["bias"])
    pos = t(vit.sincos_2d(ARCH.width, grid))
    x = (x + pos[1:])[rows, ids_visible]
    x = torch.cat([(t(enc["cls_token"])[0] + pos[:1]).expand(size, 1, -1), x], 1)
    latents = []
    for i in range(ARCH.depth):
        x = torch_block(x, enc["transformer"][f"block_{i}"])
        if i + 1 in tap_blocks[:-1]:
            latents.append(torch_layer_norm(x, params[f"tap_norm_{len(latents)}"]))
    latents.append(torch_layer_norm(x, enc["transformer"]["norm"]))
    return latents


def torch_loss(params, batch, reconstruction, scales=(4, 2, 1, 0.5)):
    """The official forward and loss in PyTorch float64, plus partial reconstruction and PR-MIM (module docstring)."""
    images = batch["images"].astype(np.float64)
    ids_visible, ids_decoded, ids_thrown = batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"]
    size, p, grid = ARCH.batch, ARCH.patch_size, ARCH.grid
    num_tokens = grid[0] * grid[1]
    rows = np.arange(size)[:, None]
    latents = torch_latents(params, batch)
    masked = np.zeros((size, num_tokens), bool)
    masked[rows, ids_decoded] = masked[rows, ids_thrown] = True
    thrown = np.zeros((size, num_tokens), bool)
    thrown[rows, ids_thrown] = True
    supervised = masked & ~thrown if reconstruction == "partial" else masked
    key_bias = torch.zeros(size, 1 + num_tokens, dtype=torch.float64)
    key_bias[:, 1:][torch.from_numpy(thrown)] = -torch.inf  # a decoder without the thrown tokens
    hog_targets = {cell: numpy_hog(images, cell) for cell in (1, 2, 4, 8)}
    total = 0.0
    for k, (latent, scale) in enumerate(zip(latents, scales, strict=True)):
        level = params[f"level_{k}"]
        dec = level["decoder"]
        y = latent @ t(dec["embed"]["kernel"]) + t(dec["embed"]["bias"])
        full = t(dec["mask_token"])[0].expand(size, num_tokens, -1).clone()
        full[rows, ids_visible] = y[:, 1:]  # unshuffle: visible latents at their ids, mask tokens elsewhere
        y = torch.cat([y[:, :1], full], 1) + t(vit.sincos_2d(ARCH.decoder_width, grid))
        for j in range(len(dec["transformer"])):
            y = torch_block(y, dec["transformer"][f"block_{j}"], key_bias if reconstruction != "full" else None)
        y = y[:, 1:]
        if reconstruction == "progressive":  # the thrown tokens from a depth-wise conv of the zero-filled grid
            zero_filled = y.masked_fill(torch.from_numpy(thrown)[..., None], 0.0)
            nchw = zero_filled.transpose(1, 2).reshape(size, -1, *grid)
            agg = level["aggregation"]
            weight = t(agg["kernel"]).permute(2, 0, 1)[:, None]  # [C, 1, k, k]
            conv = F.conv2d(nchw, weight, t(agg["bias"]), padding=ARCH.kernel_size // 2, groups=nchw.shape[1])
            y = torch.where(torch.from_numpy(thrown)[..., None], conv.flatten(2).transpose(1, 2), y)
        y = torch_layer_norm(y, level["norm"])
        if reconstruction == "partial":
            y = y.masked_fill(torch.from_numpy(thrown)[..., None], 0.0)
        prediction = torch_head(y.transpose(1, 2).reshape(size, -1, *grid), level["head"], scale)
        prediction = prediction.flatten(2).transpose(1, 2)
        target = torch.from_numpy(hog_targets[int(p / scale)].reshape(size, -1, 27))
        weights = recal_mask(torch.from_numpy(supervised.astype(np.float64)), grid, scale)
        total += (((prediction - target) ** 2).mean(-1) * weights).sum() / weights.sum()
    return float(total)


@pytest.mark.parametrize("reconstruction", ["full", "partial", "progressive"])
def test_loss_matches_a_pytorch_reference_of_the_official_model(progressive_setup, progressive_loss, reconstruction):
    _, batch, params = progressive_setup
    if reconstruction == "full":  # the same visible tokens; every masked token decoded
        batch = dict(batch, ids_decoded=np.concatenate([batch["ids_decoded"], batch["ids_thrown"]], 1))
        batch["ids_thrown"] = batch["ids_thrown"][:, :0]
    if reconstruction == "progressive":
        loss, metrics = progressive_loss(params)
    else:
        params = without_aggregation(params)
        loss, metrics, _ = jax.jit(build_method(reconstruction).loss)(methods.Variables(params), batch, None)
    expected = torch_loss(jax.device_get(params), batch, reconstruction)
    print(f"{reconstruction}: loss {float(loss):.6f}, |ours - PyTorch| {abs(float(loss) - expected):.2e}")
    assert abs(float(loss) - expected) <= LOSS_ATOL
    assert float(loss) == pytest.approx(sum(float(v) for v in metrics.values()), abs=1e-6)
    assert sorted(metrics) == ["loss_block1", "loss_block2", "loss_block3", "loss_block4"]


# ---------------------------------------------------------------- thrown-set semantics


def decoder_lengths(method, params, batch) -> list[int]:
    """The sequence length of every level's decoder output (shapes only: traced, never compiled)."""
    ids = (batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"])
    _, state = jax.eval_shape(
        lambda p: method.model.apply(
            {"params": p},
            batch["images"],
            *ids,
            capture_intermediates=lambda module, _: isinstance(module, localmim.mae_lib.Decoder),
        ),
        params,
    )
    levels = state["intermediates"]
    return [levels[f"level_{k}"]["decoder"]["__call__"][0].shape[1] for k in range(len(method.model.scales))]


def test_partial_decoders_never_see_the_thrown_tokens_and_the_loss_never_reads_them(progressive_setup):
    _, batch, params = progressive_setup
    method = build_method("partial")
    layout, model = method.layout, method.model
    lengths = decoder_lengths(method, without_aggregation(params), batch)
    assert lengths == [1 + layout.num_visible + layout.num_decoded] * 4  # cls, visible, decoded: no thrown
    # Whatever the predictions, the loss's gradient is zero at every cell of a thrown token (scales >= 1).
    targets = jax.jit(method.hog_targets)(batch["images"])
    rng = np.random.default_rng(3)
    predictions = tuple(jnp.asarray(rng.normal(size=target.shape).astype(np.float32)) for target in targets)
    weights = localmim.token_weights(batch["ids_decoded"], batch["ids_thrown"], layout.num_tokens, 0.0)
    loss = jax.jit(lambda p: localmim.multiscale_loss(p, targets, weights, model.grid, model.scales)[0])
    grads = jax.grad(loss)(predictions)
    for grad, scale in zip(grads, model.scales, strict=True):
        touched = np.abs(np.asarray(grad)).sum(-1) > 0
        thrown_cells = cells_of(batch["ids_thrown"], model, scale)
        decoded_cells = cells_of(batch["ids_decoded"], model, scale)
        if scale >= 1:
            assert not touched[thrown_cells].any() and touched[decoded_cells].all()
        else:  # a 2x2 cell pools several tokens: only a cell with a decoded token has a loss
            assert thrown_cells.any() and np.array_equal(touched, decoded_cells)


def cells_of(ids, model, scale) -> np.ndarray:
    """``[B, g_h * s, g_w * s] bool``: the cells of the tokens ``ids [B, M]`` at a head's scale."""
    tokens = np.zeros((ARCH.batch, model.grid[0] * model.grid[1]), np.float32)
    tokens[np.arange(ARCH.batch)[:, None], ids] = 1.0
    return np.asarray(localmim.weights_at_scale(jnp.asarray(tokens), model.grid, scale)) > 0


def test_progressive_supervises_every_masked_token_at_every_scale(progressive_setup, progressive_loss):
    method, batch, params = progressive_setup
    layout = method.layout
    assert decoder_lengths(method, params, batch) == [1 + layout.num_visible + layout.num_decoded] * 4
    weights = localmim.token_weights(batch["ids_decoded"], batch["ids_thrown"], layout.num_tokens, 1.0)
    masked = np.ones((ARCH.batch, layout.num_tokens))
    masked[np.arange(ARCH.batch)[:, None], batch["ids_visible"]] = 0.0
    np.testing.assert_array_equal(weights, masked)
    for scale in method.model.scales:  # the official recal_mask of the MAE mask
        expected = recal_mask(torch.from_numpy(masked), ARCH.grid, scale).numpy()
        carried = np.asarray(localmim.weights_at_scale(weights, ARCH.grid, scale)).reshape(ARCH.batch, -1)
        np.testing.assert_array_equal(carried, expected)
    # Each level's aggregator reconstructs thrown tokens that its own loss reads (and so it trains).
    _, metrics = progressive_loss(params)
    for k, block in enumerate(method.model.tap_blocks):
        changed = jax.tree_util.tree_map(lambda x: x, params)
        changed[f"level_{k}"]["aggregation"]["kernel"] = 2.0 * params[f"level_{k}"]["aggregation"]["kernel"]
        _, changed_metrics = progressive_loss(changed)
        moved = {name for name in metrics if float(changed_metrics[name]) != float(metrics[name])}
        assert moved == {f"loss_block{block}"}


def test_the_encoder_left_for_evaluation_is_the_tapped_encoder_with_the_last_levels_norm(progressive_setup):
    method, batch, params = progressive_setup
    module, encoder_params = method.encoder(params)
    assert set(encoder_params["transformer"]) == {f"block_{i}" for i in range(4)} | {"norm"}
    latent = jax.jit(module.apply)({"params": encoder_params}, batch["images"], batch["ids_visible"])
    expected = torch_latents(jax.device_get(params), batch)[-1].numpy()
    np.testing.assert_allclose(latent, expected, atol=1e-5)


def test_every_parameter_names_its_logical_axes(progressive_setup):
    method, batch, _ = progressive_setup
    boxed = jax.eval_shape(method.init, jax.random.key(0), batch).params
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim and any(n is not None for n in leaf.names), name
        assert set(leaf.names) <= {None, "embed", "decoder_embed", "mlp", "heads", "kv", "patch"}, name


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("reconstruction", ["partial", "progressive"])
@pytest.mark.parametrize("sampler", ["random_throw", "furthest", "furthest_seeded"])
def test_every_throwing_sampler_serves_partial_and_progressive(reconstruction, sampler):
    method = build_method(reconstruction, sampler=sampler)
    noise = np.stack([masking.draw_noise(np.random.default_rng(i), method.layout) for i in range(3)])
    ids = method.sample(noise)
    masking.check_token_ids(ids, method.layout)
    assert ids.thrown.shape[1] == round(16 * ARCH.throw_ratio)


def test_defaults_are_the_official_recipe_and_the_papers_table_4():
    config = localmim.model_config("B/16")
    model = localmim.build_localmim(config)
    assert model.tap_blocks == (2, 4, 10, 12) and model.scales == (4.0, 2.0, 1.0, 0.5)
    assert model.hog_cells == (4, 8, 16, 32) and model.target_features == 27
    assert (model.decoder_width, model.decoder_depth, model.decoder_num_heads) == (256, 1, 8)
    assert localmim.build_localmim(localmim.model_config("L/16")).tap_blocks == (2, 4, 22, 24)
    prmim = methods.method_config("localmim", reconstruction="progressive")
    assert (prmim.sampler, prmim.mask_ratio, prmim.throw_ratio) == ("furthest", 0.75, 0.65)
    assert methods.method_config("localmim").throw_ratio == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tap_blocks=(1, 2, 3)), "must end at the last block"),
        (dict(tap_blocks=(2, 1, 4)), "strictly increasing"),
        (dict(scales=(4.0, 2.0, 1.0)), "one head scale per tapped block"),
        (dict(scales=(8.0, 2.0, 1.0, 0.5)), "has no LocalMIM head"),
        (dict(patch_size=2, image_size=8), r"HOG cells of patch_size / scale = 0.5 pixels"),
        (dict(image_size=12), "must be even"),
    ],
)
def test_impossible_levels_fail_when_built_with_the_fix(overrides, message):
    config = ARCH.model_config()
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        localmim.build_localmim(config)


# ---------------------------------------------------------------- end to end
