"""Host-side token samplers: the partition, Alg. 1, randomness, coverage."""

import numpy as np
import pytest

from prmim_jax import masking
from prmim_jax.models import mae as mae_lib

THROWING = ("random_throw", "furthest", "furthest_seeded")
# Samplers that serve only some throw ratios (running_cell) or read weights (amt: uniform without them).
EVERY_THROWING = (*THROWING, "running_cell", "amt")


def noise_for(batch, layout, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([masking.draw_noise(rng, layout) for _ in range(batch)])


@pytest.mark.parametrize("sampler", THROWING)
@pytest.mark.parametrize(
    "grid, mask_ratio, throw_ratio", [((14, 14), 0.75, 0.5), ((7, 9), 0.6, 0.25), ((4, 4), 0.75, 0.65)]
)
def test_samplers_partition_every_grid_with_static_shapes(sampler, grid, mask_ratio, throw_ratio):
    layout = masking.TokenLayout(grid, mask_ratio, throw_ratio)
    ids = masking.sample(sampler, noise_for(16, layout), layout)
    masking.check_token_ids(ids, layout)
    assert all(a.dtype == np.int32 for a in ids)


@pytest.mark.parametrize("sampler", EVERY_THROWING)
def test_visible_tokens_are_maes_for_the_same_noise(sampler):
    layout = masking.TokenLayout((14, 14), 0.75, 0.5)
    noise = noise_for(8, layout)
    mae_ids = masking.sample("random", noise, masking.TokenLayout((14, 14), 0.75))
    ids = masking.sample(sampler, noise, layout)
    np.testing.assert_array_equal(ids.visible, mae_ids.visible)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids.decoded, ids.thrown], 1)), np.sort(mae_ids.decoded))


@pytest.mark.parametrize("sampler", EVERY_THROWING)
def test_an_images_tokens_depend_only_on_its_own_noise(sampler):
    layout = masking.TokenLayout((14, 14), 0.75, 0.5)
    noise = noise_for(6, layout)
    batch = masking.sample(sampler, noise, layout)
    alone = masking.sample(sampler, noise[3:4], layout)
    for together, single in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(together[3:4], single)


def reference_furthest(noise, layout, seeded):
    """Alg. 1 written as in the paper, one image at a time, with an explicit distance matrix."""
    coords = layout.token_coordinates().astype(float)
    order = np.argsort(noise[0], kind="stable")
    visible, masked = order[: layout.num_visible], list(order[layout.num_visible :])
    dist = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
    retained = list(visible) if seeded else []
    picks = []
    for _ in range(layout.num_decoded):
        candidates = [m for m in masked if m not in picks]
        if retained:
            nearest = np.array([dist[m, retained].min() for m in candidates])
            best = np.flatnonzero(np.isclose(nearest, nearest.max()))
        else:
            best = np.arange(len(candidates))  # the first pick is random
        # Ties break by the larger tie-break noise, a random order.
        pick = candidates[max(best, key=lambda i: noise[1][candidates[i]])]
        picks.append(pick)
        retained.append(pick)
    return np.array(picks)


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("grid", [(6, 6), (5, 8)])
def test_furthest_sampling_is_the_papers_algorithm_1(seeded, grid):
    layout = masking.TokenLayout(grid, 0.75, 0.4)
    noise = noise_for(12, layout, seed=7)
    ids = masking.sample("furthest_seeded" if seeded else "furthest", noise, layout)
    for b in range(12):
        np.testing.assert_array_equal(ids.decoded[b], reference_furthest(noise[b], layout, seeded))


def test_furthest_first_pick_is_uniform_over_the_masked_tokens():
    layout = masking.TokenLayout((4, 4), 0.5, 0.25)
    noise = noise_for(16000, layout)
    ids = masking.sample("furthest", noise, layout)
    counts = np.bincount(ids.decoded[:, 0], minlength=16)
    # each token is masked half the time and then first-picked with probability 1/8: 1000 each
    assert counts.min() > 850 and counts.max() < 1150


def test_furthest_ties_break_uniformly_not_toward_low_ids():
    # 3x3 grid, only the centre visible, one token decoded: the four corners tie at the largest distance.
    layout = masking.TokenLayout((3, 3), 0.85, 7 / 9)
    assert (layout.num_visible, layout.num_decoded) == (1, 1)
    noise = noise_for(4000, layout)
    noise[:, 0, 4] = -1.0  # the centre has the smallest noise: visible
    ids = masking.sample("furthest_seeded", noise, layout)
    counts = np.bincount(ids.decoded[:, 0], minlength=9)
    assert counts[[1, 3, 4, 5, 7]].sum() == 0
    assert all(850 < counts[c] < 1150 for c in (0, 2, 6, 8)), counts


def test_random_throw_throws_a_uniform_subset_of_the_masked_tokens():
    layout = masking.TokenLayout((4, 4), 0.75, 0.5)
    noise = noise_for(12000, layout)
    ids = masking.sample("random_throw", noise, layout)
    masked = np.zeros((12000, 16), bool)
    np.put_along_axis(masked, np.concatenate([ids.decoded, ids.thrown], 1), True, 1)
    thrown = np.zeros((12000, 16), bool)
    np.put_along_axis(thrown, ids.thrown, True, 1)
    rate = thrown.sum(0) / masked.sum(0)  # P(thrown | masked) per grid position: 8 of 12
    np.testing.assert_allclose(rate, 8 / 12, atol=0.03)


@pytest.mark.parametrize("throw_ratio, furthest_over_random", [(0.5, 0.25), (0.65, 0.8)])
def test_furthest_sampling_leaves_fewer_thrown_tokens_without_context(throw_ratio, furthest_over_random):
    layout = masking.TokenLayout((14, 14), 0.75, throw_ratio)
    noise = noise_for(512, layout)
    stats = {s: masking.uncovered_fraction(masking.sample(s, noise, layout), layout, 3) for s in THROWING}
    assert stats["random_throw"] > 0.005
    assert stats["furthest"] < furthest_over_random * stats["random_throw"]
    assert stats["furthest_seeded"] <= stats["furthest"]


def test_uncovered_fraction_counts_thrown_tokens_with_an_empty_window():
    layout = masking.TokenLayout((1, 5), 0.6, 0.4)
    ids = masking.TokenIds(np.array([[0, 1]]), np.array([[2]]), np.array([[3, 4]]))
    assert masking.uncovered_fraction(ids, layout, 3) == 0.5  # token 4 sees only 3 and itself
    assert masking.uncovered_fraction(ids, layout, 5) == 0.0


@pytest.mark.parametrize(
    "sampler, throw_ratio, message",
    [("nearest", 0.5, "unknown token sampler 'nearest'"), ("random", 0.5, "sampler 'random' .* throws nothing")],
)
def test_bad_sampler_choices_fail_with_the_fix(sampler, throw_ratio, message):
    layout = masking.TokenLayout((14, 14), 0.75, throw_ratio)
    with pytest.raises(ValueError, match=message):
        masking.sample(sampler, noise_for(1, layout), layout)


# --- running cell (VideoMAE V2) -----------------------------------------------------------------------

# The published cells: OpenGVLab/VideoMAEv2 (commit 29eab1e), dataset/masking_generator.py. ``Cell(num_masks,
# num_patches)`` holds ``queue = [1] * num_masks + [0] * num_patches`` with ``num_masks = int(4 * decoder ratio)``;
# ``get_cell()`` reads ``queue[(arange(4) + queue_ptr) % 4]`` as a row-major 2x2 cell (1: the decoder skips the
# position, ``decode_masked_pos``), tiled over the frame by ``RunningCellMaskingGenerator``, which starts each
# video at a random pointer and calls ``run_cell()`` (pointer + 1) before every frame. Written out, per pointer:
PUBLISHED_CELLS = {
    0.25: ("10/00", "00/01", "00/10", "01/00"),
    0.5: ("11/00", "10/01", "00/11", "01/10"),
    0.75: ("11/10", "11/01", "10/11", "01/11"),
}
# A video starting at pointer 0 runs through pointers 1, 2, 3, 0: at ratio 0.5 its frames are
PUBLISHED_VIDEO_FRAMES = ("10/01", "00/11", "01/10", "11/00")


def cell(text):
    return np.array([[c == "1" for c in row] for row in text.split("/")])


@pytest.mark.parametrize("ratio", sorted(PUBLISHED_CELLS))
def test_running_cell_patterns_are_videomae_v2s_cells_tiled(ratio):
    grid = (4, 6)
    patterns = masking.running_cell_patterns(grid, ratio)
    for pointer, published in enumerate(PUBLISHED_CELLS[ratio]):
        np.testing.assert_array_equal(patterns[pointer].reshape(grid), np.tile(cell(published), (2, 3)))
    # One image per frame: consecutive pointers are the published frame-to-frame run of the cell.
    if ratio == 0.5:
        for frame, published in enumerate(PUBLISHED_VIDEO_FRAMES):
            np.testing.assert_array_equal(patterns[(frame + 1) % 4].reshape(grid)[:2, :2], cell(published))


def test_running_cell_pattern_continues_periodically_across_an_odd_border():
    patterns = masking.running_cell_patterns((5, 7), 0.25).reshape(4, 5, 7)
    for pointer, published in enumerate(PUBLISHED_CELLS[0.25]):
        np.testing.assert_array_equal(patterns[pointer], np.tile(cell(published), (3, 4))[:5, :7])


def pointers_of(noise):
    return np.minimum(np.floor(4 * noise[:, 1, 0]).astype(int), 3)


@pytest.mark.parametrize("ratio, mask_ratio", [(0.25, 0.75), (0.5, 0.75), (0.75, 0.9)])
def test_running_cell_decodes_only_where_the_images_cell_keeps_a_token(ratio, mask_ratio):
    layout = masking.TokenLayout((6, 8), mask_ratio, ratio)
    noise = noise_for(400, layout)
    ids = masking.sample("running_cell", noise, layout)
    masking.check_token_ids(ids, layout)
    skipped = masking.running_cell_patterns((6, 8), ratio)[pointers_of(noise)]  # [B, N]
    thrown = np.zeros_like(skipped)
    np.put_along_axis(thrown, ids.thrown, True, 1)
    masked = thrown.copy()
    np.put_along_axis(masked, ids.decoded, True, 1)
    # Even grid: the cell skips exactly N_thr positions, so every masked token there is thrown and the
    # decoder reconstructs only tokens where the cell keeps one; the random visible tokens took the rest.
    assert not np.take_along_axis(skipped, ids.decoded, 1).any()
    assert (thrown >= (masked & skipped)).all()
    # Each image draws its own pointer: the four shifts of the cell are about equally likely.
    counts = np.bincount(pointers_of(noise), minlength=4)
    assert counts.min() > 70, counts


def test_running_cell_on_an_odd_grid_throws_the_cells_positions_first_and_keeps_static_sizes():
    layout = masking.TokenLayout((7, 7), 0.75, 0.5)  # the cell skips 21 to 28 of 49 positions; N_thr = 24
    noise = noise_for(300, layout, seed=3)
    ids = masking.sample("running_cell", noise, layout)
    masking.check_token_ids(ids, layout)
    skipped = masking.running_cell_patterns((7, 7), 0.5)[pointers_of(noise)]
    thrown_skipped = np.take_along_axis(skipped, ids.thrown, 1)
    decoded_skipped = np.take_along_axis(skipped, ids.decoded, 1)
    # Either every thrown token is one the cell skips, or every masked token the cell skips is thrown.
    assert (thrown_skipped.all(1) | ~decoded_skipped.any(1)).all()


def test_running_cell_refuses_ratios_the_cell_cannot_make():
    layout = masking.TokenLayout((14, 14), 0.75, 0.3)
    with pytest.raises(
        ValueError,
        match=r"throw_ratio must be one of \(0.25, 0.5, 0.75\) \(or 0: nothing thrown\), not 0.3; set method",
    ):
        masking.sample("running_cell", noise_for(1, layout), layout)


# --- VideoMAE V2's own running-cell decoder (running_cell_decoder='videomae') ----------------------------


def grid_mask(ids, num_tokens):
    """``[B, N] bool``, True at ``ids [B, M]``."""
    mask = np.zeros((len(ids), num_tokens), bool)
    np.put_along_axis(mask, ids, True, 1)
    return mask


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_videomae_decoder_decodes_every_position_its_cell_keeps_visible_ones_included(ratio):
    layout = masking.TokenLayout((4, 4), 0.75, ratio, running_cell_decoder="videomae")
    noise = noise_for(200, layout)
    ids = masking.sample("running_cell", noise, layout)
    masking.check_token_ids(ids, layout)
    skipped = masking.running_cell_patterns((4, 4), ratio)[pointers_of(noise)]  # [B, N]
    assert ids.decoded.shape == (200, 16 - round(16 * ratio)) and ids.thrown.shape == (200, round(16 * ratio))
    np.testing.assert_array_equal(grid_mask(ids.decoded, 16), ~skipped)
    np.testing.assert_array_equal(grid_mask(ids.thrown, 16), skipped)
    # The encoder's mask is MAE's whatever the cell, so visible tokens land on kept and skipped positions alike.
    np.testing.assert_array_equal(
        ids.visible, masking.random_masking(noise[:, 0], masking.TokenLayout((4, 4), 0.75)).visible
    )
    visible = grid_mask(ids.visible, 16)
    assert (visible & ~skipped).any() and (visible & skipped).any()


def test_videomae_decoder_accounting_at_mask_075_and_cell_ratio_05_on_14x14():
    """The numbers of the masking module docstring's table: N = 196, 49 visible, 147 masked."""
    ours_layout = masking.TokenLayout((14, 14), 0.75, 0.5)
    layout = masking.TokenLayout((14, 14), 0.75, 0.5, running_cell_decoder="videomae")
    noise = noise_for(2000, layout)
    ids = masking.sample("running_cell", noise, layout)
    assert (ids.visible.shape[1], ids.decoded.shape[1], ids.thrown.shape[1]) == (49, 98, 98)  # decoder: 49 + 98
    masked = ~grid_mask(ids.visible, 196)
    masked_kept = np.take_along_axis(masked, ids.decoded, 1).sum(1)  # what the loss covers, per image
    masked_skipped = np.take_along_axis(masked, ids.thrown, 1).sum(1)  # masked, never reconstructed
    assert (masked_kept + masked_skipped == 147).all() and masked_kept.min() < masked_kept.max()
    # The loss weighs a decoded position 1 exactly where it is masked.
    weight = np.asarray(mae_lib.masked_weight(ids.visible, ids.decoded, 196))
    np.testing.assert_array_equal(weight, np.take_along_axis(masked, ids.decoded, 1).astype(np.float32))
    # Hypergeometric: 73.5 tokens (37.5% of N) each on average, standard deviation 3.0 per image.
    assert abs(masked_skipped.mean() / 196 - 0.375) < 0.002 and abs(masked_kept.mean() / 196 - 0.375) < 0.002
    assert 2.7 < masked_kept.std() < 3.4
    assert abs(np.take_along_axis(~masked, ids.decoded, 1).sum(1).mean() - 24.5) < 0.4  # visible, decoded twice
    # Ours from the same noise: the same visible tokens, exactly 98 masked thrown (50%), all 49 decoded masked.
    ours = masking.sample("running_cell", noise, ours_layout)
    np.testing.assert_array_equal(ours.visible, ids.visible)
    assert ours.decoded.shape[1] == 49 and ours.thrown.shape[1] == 98
    assert np.take_along_axis(masked, ours.decoded, 1).all() and np.take_along_axis(masked, ours.thrown, 1).all()


def test_videomae_decoder_ids_that_do_not_split_the_grid_are_refused():
    layout = masking.TokenLayout((4, 4), 0.75, 0.5, running_cell_decoder="videomae")
    ids = masking.sample("running_cell", noise_for(2, layout), layout)
    with pytest.raises(ValueError, match="decoded and thrown ids must partition range"):
        masking.check_token_ids(ids._replace(decoded=ids.thrown, thrown=ids.thrown), layout)
    with pytest.raises(ValueError, match="visible ids must be distinct tokens"):
        masking.check_token_ids(ids._replace(visible=np.zeros_like(ids.visible)), layout)


# --- AMT ----------------------------------------------------------------------------------------------


def exact_draw_probabilities(weights):
    """Reference: every order of a sequential draw without replacement (torch.multinomial), enumerated."""
    import itertools

    orders = {}
    for order in itertools.permutations(range(len(weights))):
        left, probability = float(sum(weights)), 1.0
        for item in order:
            probability *= weights[item] / left
            left -= weights[item]
        orders[order] = probability
    return orders


def test_amt_draws_in_proportion_to_the_attention_first_drawn_decoded_last_drawn_visible():
    # 2x2 grid, mask 0.5, throw 0.25: AMT's order gives 1 decoded (first drawn), 1 thrown, 2 visible (last).
    layout = masking.TokenLayout((2, 2), 0.5, 0.25)
    weights = np.array([4.0, 2.0, 1.0, 0.5])
    noise = noise_for(40000, layout)
    ids = masking.sample("amt", noise, layout, np.broadcast_to(weights, (40000, 4)))
    masking.check_token_ids(ids, layout)
    expected = {"decoded": np.zeros(4), "thrown": np.zeros(4), "visible": np.zeros(4)}
    for order, probability in exact_draw_probabilities(weights).items():
        expected["decoded"][order[0]] += probability
        expected["thrown"][order[1]] += probability
        expected["visible"][list(order[2:])] += probability
    for name, probability in expected.items():
        frequency = np.bincount(getattr(ids, name).reshape(-1), minlength=4) / 40000
        np.testing.assert_allclose(frequency, probability, atol=0.01, err_msg=name)
    # High attention is reconstructed, low attention seen.
    assert expected["decoded"][0] > 0.5 and expected["visible"][3] > 0.8


def test_amt_draws_zero_weight_tokens_last():
    layout = masking.TokenLayout((2, 4), 0.75, 0.25)  # 2 visible
    weights = np.broadcast_to(np.array([1.0, 3.0, 2.0, 0.0, 1.0, 0.0, 5.0, 1.0]), (500, 8))
    ids = masking.sample("amt", noise_for(500, layout), layout, weights)
    np.testing.assert_array_equal(np.sort(ids.visible, 1), np.broadcast_to([3, 5], (500, 2)))


@pytest.mark.parametrize("granularity", ["token", "unit"])
def test_amt_on_simmim_units_keeps_simmims_visible_units_for_uniform_weights(granularity):
    layout = masking.TokenLayout((8, 8), 0.6, 0.25, mask_unit=2, throw_granularity=granularity)
    noise = noise_for(32, layout)
    ids = masking.sample("amt", noise, layout)
    masking.check_token_ids(ids, layout)
    simmim = masking.sample("random", noise, masking.TokenLayout((8, 8), 0.6, mask_unit=2))
    np.testing.assert_array_equal(ids.visible, simmim.visible)
    weights = np.zeros((32, 64))
    weights[:, :8] = 1.0  # attention on the top two token rows: units 0-3
    ids = masking.sample("amt", noise, layout, weights)
    masking.check_token_ids(ids, layout)
    assert not np.isin(ids.visible, np.arange(16)).any()  # units drawn first are masked, never visible
