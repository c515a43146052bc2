"""The token index convention of prmim_jax.masking."""

import numpy as np
import pytest

from prmim_jax import masking


def test_visible_count_follows_mae_len_keep():
    # 7x7 at 0.75: MAE keeps int(49 * 0.25) = 12 visible; int(49 * 0.75) = 36 masked would give 13.
    layout = masking.TokenLayout((7, 7), mask_ratio=0.75)
    assert (layout.num_visible, layout.num_masked, layout.num_decoded, layout.num_thrown) == (12, 37, 37, 0)


def test_vit_b_geometry_counts_match_the_paper_table_1():
    layout = masking.TokenLayout((14, 14), mask_ratio=0.75, throw_ratio=0.5)
    assert layout.num_tokens == 196
    assert layout.num_visible == 49  # N (1 - rho_e)
    assert layout.num_thrown == 98  # N rho_d
    assert layout.num_decoded == 49  # N (rho_e - rho_d)


def test_token_coordinates_are_row_major():
    coords = masking.TokenLayout((2, 3), mask_ratio=0.5).token_coordinates()
    np.testing.assert_array_equal(coords, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


@pytest.mark.parametrize(
    "grid, mask_ratio, throw_ratio, message",
    [
        ((14, 14), 0.75, 0.8, "only masked tokens can be thrown"),
        ((14, 14), 1.0, 0.0, "at least one visible token"),
        ((14, 14), 0.75, 0.75, "at least one"),
        ((2, 2), 0.9, 0.0, "no visible token"),
        ((0, 4), 0.5, 0.0, "empty"),
    ],
)
def test_impossible_layouts_fail_with_the_fix(grid, mask_ratio, throw_ratio, message):
    with pytest.raises(ValueError, match=message):
        masking.TokenLayout(grid, mask_ratio, throw_ratio)


def test_random_masking_keeps_the_smallest_noise_visible():
    layout = masking.TokenLayout((4, 4), mask_ratio=0.75)
    noise = np.random.default_rng(0).uniform(size=(5, 16))
    ids = masking.random_masking(noise, layout)
    masking.check_token_ids(ids, layout)
    assert ids.visible.dtype == np.int32 and ids.thrown.shape == (5, 0)
    visible_noise = np.take_along_axis(noise, ids.visible, 1)
    decoded_noise = np.take_along_axis(noise, ids.decoded, 1)
    assert (visible_noise.max(1) < decoded_noise.min(1)).all()
    # Within each set the ids follow ascending noise, as MAE's ids_keep.
    assert (np.diff(visible_noise, axis=1) > 0).all() and (np.diff(decoded_noise, axis=1) > 0).all()


def test_random_masking_rejects_noise_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"expected \[batch, 16\]"):
        masking.random_masking(np.zeros((2, 15)), masking.TokenLayout((4, 4), 0.75))


def test_check_token_ids_catches_a_repeated_token():
    layout = masking.TokenLayout((2, 2), mask_ratio=0.5)
    ids = masking.TokenIds(np.array([[0, 1]]), np.array([[1, 3]]), np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="partition"):
        masking.check_token_ids(ids, layout)
