"""The aggregation designs of the paper's Table 12: what each reads, what it computes, and how it is configured.

Every design maps ``(features [B, M, C], ids_present [B, M], ids_thrown [B, T]) -> [B, T, C]``; the local ones
(dwconv, convnext, avgpool) read only a thrown token's k x k window, the transformer block reads the whole grid.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prmim_jax import masking
from prmim_jax.models import aggregate, layers, tokens, vit

WIDTH = 8
HEADS = 2


def build(design, grid=(6, 6), kernel_size=3, dtype=jnp.float32, **kw):
    return aggregate.build_aggregator(design, grid, kernel_size, dtype, WIDTH, num_heads=HEADS, **kw)


def sampled_ids(grid, batch=2, seed=0):
    """``(ids_present [B, M], ids_thrown [B, T])`` from the furthest sampler at rho_e 0.75, rho_d 0.5."""
    layout = masking.TokenLayout(grid, 0.75, 0.5)
    rng = np.random.default_rng(seed)
    ids = masking.sample("furthest", np.stack([masking.draw_noise(rng, layout) for _ in range(batch)]), layout)
    return np.concatenate([ids.visible, ids.decoded], axis=1), ids.thrown


def ids_with_thrown(grid, thrown_cells):
    """One image whose thrown tokens are ``thrown_cells`` ``[(row, col), ...]`` and every other token is present."""
    thrown = [row * grid[1] + col for row, col in thrown_cells]
    present = [i for i in range(grid[0] * grid[1]) if i not in thrown]
    return np.asarray([present], np.int32), np.asarray([thrown], np.int32)


# Added to one token's features to see who reads it: not a constant, which a LayerNorm would remove.
PERTURBATION = jnp.linspace(-1.0, 1.5, WIDTH)


def random_features(ids_present, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(*ids_present.shape, WIDTH)).astype(dtype))


def init(module, features, ids_present, ids_thrown):
    return nn.unbox(module.init(jax.random.key(0), features, ids_present, ids_thrown))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("design", aggregate.AGGREGATORS)
def test_every_design_returns_one_feature_per_thrown_token_in_its_dtype(design, dtype):
    ids_present, ids_thrown = sampled_ids((6, 6))
    features = random_features(ids_present).astype(dtype)
    module = build(design, dtype=dtype)
    out = module.apply(init(module, features, ids_present, ids_thrown), features, ids_present, ids_thrown)
    assert out.shape == (*ids_thrown.shape, WIDTH)
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("design", aggregate.LOCAL_AGGREGATORS)
def test_local_designs_read_only_the_window_of_a_thrown_token(design, kernel_size):
    grid = (9, 9)
    ids_present, ids_thrown = ids_with_thrown(grid, [(4, 4), (0, 0), (8, 3)])
    features = random_features(ids_present)
    module = build(design, grid, kernel_size)
    variables = init(module, features, ids_present, ids_thrown)
    centre = module.apply(variables, features, ids_present, ids_thrown)[0, 0]
    radius = kernel_size // 2

    def centre_after_perturbing(cell):
        slot = list(ids_present[0]).index(cell[0] * grid[1] + cell[1])
        perturbed = features.at[0, slot].add(PERTURBATION)
        return module.apply(variables, perturbed, ids_present, ids_thrown)[0, 0]

    for outside in [(4, 4 + radius + 1), (4 - radius - 1, 4 - radius - 1)]:
        np.testing.assert_array_equal(centre_after_perturbing(outside), centre)
    for inside in [(4, 4 + radius), (4 - radius, 4 - radius)]:
        assert np.abs(centre_after_perturbing(inside) - centre).max() > 1e-3


def test_the_transformer_block_reads_every_present_token_of_the_grid():
    grid = (9, 9)
    ids_present, ids_thrown = ids_with_thrown(grid, [(4, 4), (0, 0)])
    features = random_features(ids_present)
    module = build("transformer", grid)
    variables = init(module, features, ids_present, ids_thrown)
    centre = module.apply(variables, features, ids_present, ids_thrown)[0, 0]
    far_corner = list(ids_present[0]).index(8 * grid[1] + 8)
    perturbed = features.at[0, far_corner].add(PERTURBATION)
    assert np.abs(module.apply(variables, perturbed, ids_present, ids_thrown)[0, 0] - centre).max() > 1e-4


def test_the_transformer_block_tells_thrown_tokens_apart_by_their_position():
    # With identical present features, only the position table distinguishes two thrown tokens.
    grid = (6, 6)
    ids_present, ids_thrown = ids_with_thrown(grid, [(1, 1), (4, 3)])
    features = jnp.ones((*ids_present.shape, WIDTH))
    module = build("transformer", grid)
    out = module.apply(init(module, features, ids_present, ids_thrown), features, ids_present, ids_thrown)
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3


@pytest.mark.parametrize("design", aggregate.AGGREGATORS)
def test_outputs_follow_the_order_of_the_thrown_ids_and_ignore_the_order_of_the_present_ones(design):
    ids_present, ids_thrown = sampled_ids((6, 6))
    features = random_features(ids_present)
    module = build(design)
    variables = init(module, features, ids_present, ids_thrown)
    out = module.apply(variables, features, ids_present, ids_thrown)
    rng = np.random.default_rng(1)
    thrown_order = rng.permutation(ids_thrown.shape[1])
    present_order = rng.permutation(ids_present.shape[1])
    shuffled = module.apply(
        variables, features[:, present_order], ids_present[:, present_order], ids_thrown[:, thrown_order]
    )
    np.testing.assert_allclose(shuffled, out[:, thrown_order], rtol=1e-6, atol=1e-6)


def cells_in_a_thrown_window(ids_present, ids_thrown, grid, kernel_size):
    """``[B, M] bool``: which present tokens lie in the ``k x k`` window of some thrown token."""
    radius = kernel_size // 2
    rows, cols = np.divmod(ids_present, grid[1])
    thrown_rows, thrown_cols = np.divmod(ids_thrown, grid[1])
    near = (np.abs(rows[:, :, None] - thrown_rows[:, None]) <= radius) & (
        np.abs(cols[:, :, None] - thrown_cols[:, None]) <= radius
    )
    return near.any(-1)


@pytest.mark.parametrize(
    "design, options",
    [("dwconv", {}), ("convnext", {}), ("convnext", {"layer_scale_init": 0.5}), ("transformer", {}), ("avgpool", {})],
)
def test_gradients_reach_every_parameter_and_the_present_features_the_output_reads(design, options):
    grid = (6, 6)
    ids_present, ids_thrown = sampled_ids(grid)
    features = random_features(ids_present)
    module = build(design, grid, **options)
    variables = init(module, features, ids_present, ids_thrown)
    cotangent = random_features(ids_thrown, seed=2)

    def contracted(variables, features):
        return jnp.vdot(module.apply(variables, features, ids_present, ids_thrown), cotangent)

    param_grads, feature_grads = jax.grad(contracted, argnums=(0, 1))(variables, features)
    for path, grad in jax.tree_util.tree_leaves_with_path(param_grads):
        names = layers.path_names(path)
        if names[-2:] == ["key", "bias"]:
            # q . (k + b) shifts every score of a query by the same q . b: softmax ignores it.
            continue
        assert np.abs(grad).max() > 0, names
    reached = np.abs(np.asarray(feature_grads)).max(-1) > 0
    if design == "transformer":
        assert reached.all()
    else:
        np.testing.assert_array_equal(reached, cells_in_a_thrown_window(ids_present, ids_thrown, grid, 3))
    if design == "avgpool":
        assert param_grads == {}  # a parameter-free design, as the paper's Table 12 lists it (no FLOPs)


def test_average_pooling_is_the_mean_of_the_present_neighbours_not_of_the_zero_fill():
    grid = (7, 7)
    block = [(row, col) for row in (2, 3, 4) for col in (2, 3, 4)]  # (3, 3) has no present token in its 3x3
    ids_present, ids_thrown = ids_with_thrown(grid, block)
    value = jnp.linspace(-1.0, 2.0, WIDTH)
    module = build("avgpool", grid, 3)
    out = module.apply({}, jnp.broadcast_to(value, (*ids_present.shape, WIDTH)), ids_present, ids_thrown)
    centre = block.index((3, 3))
    for slot in range(len(block)):
        expected = np.zeros(WIDTH) if slot == centre else value
        np.testing.assert_allclose(out[0, slot], expected, rtol=1e-6, atol=1e-7)


def test_average_pooling_equals_an_explicit_mean_over_each_window():
    grid = (6, 6)
    ids_present, ids_thrown = sampled_ids(grid)
    features = random_features(ids_present)
    out = np.asarray(build("avgpool", grid, 5).apply({}, features, ids_present, ids_thrown))
    features = np.asarray(features)
    for b in range(ids_thrown.shape[0]):
        position = {int(token): slot for slot, token in enumerate(ids_present[b])}
        for t, token in enumerate(ids_thrown[b]):
            row, col = divmod(int(token), grid[1])
            window = [
                position[r * grid[1] + c]
                for r in range(row - 2, row + 3)
                for c in range(col - 2, col + 3)
                if 0 <= r < grid[0] and 0 <= c < grid[1] and r * grid[1] + c in position
            ]
            expected = features[b, window].mean(axis=0) if window else np.zeros(WIDTH)
            np.testing.assert_allclose(out[b, t], expected, rtol=1e-5, atol=1e-6)


def grouped_convolution(grid_nhwc, kernel):
    """XLA's own depth-wise convolution (``feature_group_count=C``), zero padding: the independent reference."""
    return jax.lax.conv_general_dilated(
        grid_nhwc,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=grid_nhwc.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )


def reference_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + layers.LAYER_NORM_EPS) * scale + bias


def test_convnext_equals_a_convnext_block_over_the_whole_grid_read_at_the_thrown_tokens():
    grid = (6, 6)
    ids_present, ids_thrown = sampled_ids(grid)
    features = random_features(ids_present)
    module = build("convnext", grid, 5, layer_scale_init=0.5)
    params = init(module, features, ids_present, ids_thrown)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    batch, num_tokens = ids_present.shape[0], grid[0] * grid[1]
    rows = np.arange(batch)[:, None]
    zero_filled = jnp.zeros((batch, num_tokens, WIDTH)).at[rows, ids_present].set(features)
    mixed = grouped_convolution(zero_filled.reshape(batch, *grid, WIDTH), params["dwconv"]["kernel"])
    mixed = mixed.reshape(batch, num_tokens, WIDTH) + params["dwconv"]["bias"]
    hidden = reference_layer_norm(mixed, params["norm"]["scale"], params["norm"]["bias"])
    mlp = params["mlp"]
    hidden = jax.nn.gelu(hidden @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"], approximate=False)
    block = zero_filled + params["layer_scale"] * (hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"])
    with jax.default_matmul_precision("highest"):
        ours = module.apply({"params": params}, features, ids_present, ids_thrown)
        np.testing.assert_allclose(ours, block[rows, ids_thrown], rtol=1e-5, atol=1e-5)


def test_transformer_equals_a_vit_block_over_the_positioned_grid_read_at_the_thrown_tokens():
    grid = (6, 6)
    ids_present, ids_thrown = sampled_ids(grid)
    features = random_features(ids_present)
    module = build("transformer", grid)
    params = init(module, features, ids_present, ids_thrown)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    batch, num_tokens = ids_present.shape[0], grid[0] * grid[1]
    rows = np.arange(batch)[:, None]
    zero_filled = jnp.zeros((batch, num_tokens, WIDTH)).at[rows, ids_present].set(features)
    positioned = zero_filled + vit.sincos_2d(WIDTH, grid, with_cls=False)
    with jax.default_matmul_precision("highest"):
        block = vit.Block(HEADS, 4 * WIDTH).apply({"params": params["block"]}, positioned)
        ours = module.apply({"params": params}, features, ids_present, ids_thrown)
        np.testing.assert_allclose(ours, tokens.take(block, ids_thrown), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("design", ["transformer", "convnext"])
def test_the_whole_grid_form_has_the_same_parameters_and_outputs(design):
    ids_present, ids_thrown = sampled_ids((6, 6))
    features = random_features(ids_present)
    thrown_only, whole_grid = build(design), build(design, whole_grid=True)
    variables = init(thrown_only, features, ids_present, ids_thrown)
    shapes = jax.tree_util.tree_map(jnp.shape, variables)
    assert jax.tree_util.tree_map(jnp.shape, init(whole_grid, features, ids_present, ids_thrown)) == shapes
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            whole_grid.apply(variables, features, ids_present, ids_thrown),
            thrown_only.apply(variables, features, ids_present, ids_thrown),
            rtol=1e-5,
            atol=1e-5,
        )


def test_dwconv_is_the_paper_module_with_its_checkpoint_names():
    module = aggregate.build_aggregator("dwconv", (14, 14), 7, jnp.float32, 512, num_heads=16, mlp_ratio=4.0)
    assert isinstance(module, aggregate.ProgressiveAggregation)
    ids_present, ids_thrown = sampled_ids((14, 14))
    features = jax.ShapeDtypeStruct((*ids_present.shape, 512), jnp.float32)
    shapes = jax.eval_shape(lambda f: nn.unbox(module.init(jax.random.key(0), f, ids_present, ids_thrown)), features)
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == {"params": {"kernel": (7, 7, 512), "bias": (512,)}}


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("design", aggregate.AGGREGATORS)
def test_kernel_sizes_3_to_11_build_on_the_vit_b_token_grid(design, kernel_size):
    module = build(design, (14, 14), kernel_size)
    ids_present, ids_thrown = sampled_ids((14, 14))
    features = jax.ShapeDtypeStruct((*ids_present.shape, WIDTH), jnp.float32)

    def forward(features):
        variables = nn.unbox(module.init(jax.random.key(0), features, ids_present, ids_thrown))
        return variables, module.apply(variables, features, ids_present, ids_thrown)

    variables, out = jax.eval_shape(forward, features)
    assert out.shape == (*ids_thrown.shape, WIDTH)
    kernels = {"dwconv": variables.get("params", {}).get("kernel")}
    kernels["convnext"] = variables.get("params", {}).get("dwconv", {}).get("kernel")
    if design in kernels:
        assert kernels[design].shape == (kernel_size, kernel_size, WIDTH)


@pytest.mark.parametrize(
    "name, kernel_size, options, fix",
    [
        ("dwconvs", 7, {}, "choose one of"),
        ("dwconv", 6, {}, "odd integer >= 3"),
        ("convnext", 1, {}, "odd integer >= 3"),
        ("avgpool", 15, {}, "odd kernel_size <= 14"),
        ("convnext", 7, {"num_head": 4}, "the options are"),
        ("transformer", 7, {"num_heads": 3}, "pass num_heads="),
    ],
)
def test_bad_configurations_raise_value_errors_that_name_the_fix(name, kernel_size, options, fix):
    with pytest.raises(ValueError, match=fix):
        aggregate.build_aggregator(name, (14, 14), kernel_size, jnp.float32, 512, **options)


def test_features_of_another_width_than_built_for_are_rejected():
    ids_present, ids_thrown = sampled_ids((6, 6))
    module = aggregate.build_aggregator("convnext", (6, 6), 3, jnp.float32, 2 * WIDTH)
    with pytest.raises(ValueError, match="pass the decoder width"):
        module.init(jax.random.key(0), random_features(ids_present), ids_present, ids_thrown)


@pytest.mark.parametrize("kernel_size", [3, 5, 9, 11])
def test_the_handwritten_depthwise_gradient_equals_xlas_grouped_convolution(kernel_size):
    rng = np.random.default_rng(kernel_size)
    grid = jnp.asarray(rng.normal(size=(2, 14, 14, 4)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 4)).astype(np.float32))
    cotangent = jnp.asarray(rng.normal(size=grid.shape).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        ours, ours_vjp = jax.vjp(aggregate.depthwise_conv, grid, kernel)
        reference, reference_vjp = jax.vjp(grouped_convolution, grid, kernel)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    for a, b in zip(ours_vjp(cotangent), reference_vjp(cotangent), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3 if kernel_size > 5 else 1e-4)


@pytest.mark.parametrize("design", ["dwconv", "transformer", "convnext"])  # avgpool has no parameters
def test_every_parameter_names_its_logical_axes(design):
    module = build(design, (6, 6))
    ids_present, ids_thrown = sampled_ids((6, 6))
    features = jax.ShapeDtypeStruct((*ids_present.shape, WIDTH), jnp.float32)
    boxed = jax.eval_shape(lambda f: module.init(jax.random.key(0), f, ids_present, ids_thrown), features)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("design", aggregate.AGGREGATORS)
def test_no_gradient_compiles_to_an_xla_convolution(design):
    # XLA CPU's kernel gradient of a grouped convolution is a dense C x C convolution (module docstring).
    ids_present, ids_thrown = sampled_ids((6, 6))
    features = random_features(ids_present)
    module = build(design)
    variables = init(module, features, ids_present, ids_thrown)

    def loss(variables, features):
        return jnp.sum(module.apply(variables, features, ids_present, ids_thrown) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, features).compile()
    assert " convolution(" not in compiled.as_text()
