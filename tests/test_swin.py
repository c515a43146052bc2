"""The Swin Transformer's pieces: window geometry, the shifted-window mask, relative position indexing, which
tokens a block mixes, the paper's sizes, the refusal of images that do not tile, layer-wise lr decay's layers and
the resizing of relative position tables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prmim_jax import optim
from prmim_jax.models import classifier, swin

# Parameter counts of the official models at 224 with a 1000-class head (timm reports the same).
OFFICIAL_PARAMETERS = {"T": 28_288_354, "S": 49_606_258, "B": 87_768_224, "L": 196_532_476}


def test_relative_position_index_gives_each_offset_its_own_table_row():
    window = (3, 4)
    index = swin.relative_position_index(window)
    coords = [divmod(t, window[1]) for t in range(window[0] * window[1])]
    row_of_offset = {}
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            row_of_offset.setdefault((ri - rj, ci - cj), set()).add(int(index[i, j]))
    assert all(len(rows) == 1 for rows in row_of_offset.values())  # one offset, one row
    rows = sorted(next(iter(r)) for r in row_of_offset.values())
    assert rows == list(range(swin.relative_position_table_size(window)))  # every row used, by one offset each
    assert set(np.diag(index)) == {swin.relative_position_table_size(window) // 2}  # self-attention: the centre


@pytest.mark.parametrize("grid, window, shift", [((8, 12), 4, 2), ((14, 14), 7, 3)])
def test_shifted_window_mask_keeps_apart_tokens_the_cyclic_shift_brought_together(grid, window, shift):
    mask = swin.shifted_window_mask(grid, window, shift)
    # Token (r, c) of the shifted grid came from ((r + shift) % H, (c + shift) % W); it wrapped around an edge
    # when r + shift >= H. Two tokens of one window were neighbours in the image iff they wrapped alike.
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    wrapped = np.stack([rows + shift >= grid[0], cols + shift >= grid[1]], axis=-1).astype(np.float32)
    windows = np.asarray(swin.window_partition(jnp.asarray(wrapped)[None], window))[0]  # [nW, N, 2]
    alike = np.all(windows[:, :, None, :] == windows[:, None, :, :], axis=-1)
    np.testing.assert_array_equal(mask == 0.0, alike)
    assert set(np.unique(mask)) == {0.0, swin.MASK_VALUE}
    assert mask.shape == ((grid[0] // window) * (grid[1] // window), window * window, window * window)


def test_shifted_windows_partition_and_merge_are_inverse():
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8 * 12, 5)), jnp.float32)
    for shift in (0, 2):
        windows = swin.ShiftedWindows((8, 12), 4, shift)
        grouped = windows.partition(tokens)
        assert grouped.shape == (2, 6, 16, 5)
        np.testing.assert_array_equal(windows.merge(grouped), tokens)


def changed_tokens(shift: int, tokens: list[tuple[int, int]]) -> list[set[tuple[int, int]]]:
    """For each of ``tokens``: the positions of an 8x8 grid whose block output (window 4) changes when that
    token's input changes."""
    block = swin.SwinBlock(num_heads=2, window_size=4, mlp_dim=16)
    windows = swin.ShiftedWindows((8, 8), 4, shift)
    x = np.random.default_rng(0).normal(size=(1 + len(tokens), 64, 8)).astype(np.float32)
    x[1:] = x[0]
    for i, (row, col) in enumerate(tokens, 1):
        x[i, row * 8 + col] += np.linspace(-1.0, 1.0, 8)  # not constant: LayerNorm would remove it
    params = jax.jit(block.init)(jax.random.key(0), x, windows)
    out = np.asarray(jax.jit(block.apply)(params, x, windows))
    difference = np.abs(out[1:] - out[:1]).max(axis=-1)  # [tokens, 64]
    return [{divmod(int(t), 8) for t in np.flatnonzero(row > 1e-6)} for row in difference]


def test_a_block_mixes_tokens_within_its_windows_and_the_shift_moves_the_windows():
    def square(first, last):
        return {(r, c) for r in range(first, last + 1) for c in range(first, last + 1)}

    assert changed_tokens(shift=0, tokens=[(3, 3)]) == [square(0, 3)]  # the unshifted window of (3, 3)
    # The shift moves the windows; (0, 0) is rolled next to (6, 6) and (7, 7), and the mask keeps it among its own.
    assert changed_tokens(shift=2, tokens=[(3, 3), (0, 0)]) == [square(2, 5), square(0, 1)]


@pytest.mark.parametrize("variant", ["T", "S", "B", "L"])
def test_variants_have_the_official_parameter_counts(variant):
    model = swin.build_swin(swin.model_config(variant), num_classes=1000)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params))) == OFFICIAL_PARAMETERS[variant]


def test_swin_b_at_224_gives_a_7x7_grid_of_1024_features():
    model = swin.build_swin(swin.model_config("B"), num_classes=1000)
    out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, 224, 224, 3)))
    assert (out.features.shape, out.pooled.shape, out.logits.shape) == ((2, 7, 7, 1024), (2, 1024), (2, 1000))
    assert [(s.grid, s.width, s.num_heads) for s in model.stages] == [
        ((56, 56), 128, 4),
        ((28, 28), 256, 8),
        ((14, 14), 512, 16),
        ((7, 7), 1024, 32),
    ]
    assert [(s.window, s.shift) for s in model.stages] == [(7, 3), (7, 3), (7, 3), (7, 0)]  # the last is one window


def test_a_stage_no_larger_than_the_window_is_one_unshifted_window():
    assert swin.stage_window((7, 7), 7) == (7, 0)
    assert swin.stage_window((4, 8), 7) == (4, 0)
    assert swin.stage_window((14, 14), 7) == (7, 3)


@pytest.mark.parametrize(
    "image_size, patch_size, window_size, message",
    [
        (100, 8, 4, r"image_size 100x100 is not a multiple of patch_size 8"),
        (112, 8, 4, r"stage 0's 14x14 token grid does not tile into 4x4 windows.* use image_size 64 or 128"),
        ((64, 96), 8, 4, r"stage 1's 4x6 token grid does not tile into 4x4 windows"),
        (28, 4, 7, r"stage 0's 7x7 token grid cannot be merged 2x2 for stage 1.* use image_size 224"),
    ],
)
def test_an_image_that_does_not_tile_into_windows_is_refused_with_sizes_that_do(
    image_size, patch_size, window_size, message
):
    config = swin.model_config("T", image_size=image_size, patch_size=patch_size, window_size=window_size)
    with pytest.raises(ValueError, match=message) as error:
        swin.build_swin(config)
    assert "Swin does not pad" in str(error.value)


def test_a_non_square_image_that_tiles_runs():
    model = swin.build_swin(
        swin.model_config("T", image_size=(64, 128), window_size=4, width=8, depths=(1, 1), num_heads=(1, 1))
    )
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, 64, 128, 3)))[0]
    assert out.features.shape == (2, 8, 16, 16)


def test_drop_path_grows_linearly_over_the_blocks_of_all_stages():
    assert swin.drop_path_rates(0.3, 4) == pytest.approx((0.0, 0.1, 0.2, 0.3))
    stages = swin.stage_layouts((224, 224), 4, 96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert [s.first_block for s in stages] == [0, 2, 4, 10]


def test_layer_wise_lr_decay_follows_the_official_swin_rule():
    model = classifier.build_classifier(
        classifier.swin_classifier_config(
            "T", image_size=64, window_size=2, width=8, num_heads=(1, 1, 1, 1), num_classes=10
        )
    )
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    depth, layer_ids = classifier.lr_layers(model)
    layers = layer_ids(params)
    encoder = layers["encoder"]
    expected = {  # SimMIM's get_swin_layer: embedding 0, blocks 1..12 across stages, merging with its stage's last
        0: [encoder["patch_embed"]["kernel"], encoder["patch_norm"]["scale"]],
        1: [encoder["stage_0"]["block_0"]["attn"]["relative_position_bias_table"]],
        2: [encoder["stage_0"]["block_1"]["mlp"]["fc1"]["kernel"], encoder["stage_0"]["downsample"]["norm"]["bias"]],
        3: [encoder["stage_1"]["block_0"]["norm1"]["scale"]],
        10: [
            encoder["stage_2"]["block_5"]["attn"]["query"]["kernel"],
            encoder["stage_2"]["downsample"]["reduction"]["kernel"],
        ],
        12: [encoder["stage_3"]["block_1"]["norm2"]["bias"]],
        13: [encoder["norm"]["scale"], layers["head"]["kernel"]],
    }
    assert depth == 12
    for layer, found in expected.items():
        assert found == [layer] * len(found), layer
    ones = jax.tree.map(lambda p: np.ones(p.shape), params)
    scaled, _ = optim.scale_by_layer(0.5, depth, layer_ids).update(ones, optax.EmptyState())
    assert float(scaled["encoder"]["patch_embed"]["kernel"][0, 0]) == 0.5**13
    assert float(scaled["encoder"]["stage_2"]["downsample"]["reduction"]["kernel"][0, 0]) == 0.5**3
    assert float(scaled["head"]["kernel"][0, 0]) == 1.0
    decays = optim.weight_decay_mask(params)["encoder"]["stage_0"]["block_0"]["attn"]
    assert not decays["relative_position_bias_table"] and decays["query"]["kernel"]  # the official Swin's exclusion


def test_relative_position_tables_resize_to_another_window():
    table = np.random.default_rng(0).normal(size=(7 * 7, 3)).astype(np.float32)  # a 4 x 4 window's
    resized = swin.resize_relative_position_table(table, (7, 7))
    assert resized.shape == (13 * 13, 3)
    centre = swin.relative_position_table_size((7, 7)) // 2
    np.testing.assert_allclose(resized[centre], table[len(table) // 2], atol=1e-5)  # a token's bias to itself is kept
    np.testing.assert_allclose(swin.resize_relative_position_table(np.ones((49, 2)), (7, 7)), 1.0, atol=1e-6)
    assert swin.resize_relative_position_table(table, (4, 4)) is table
