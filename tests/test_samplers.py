"""Host-side token samplers: the partition, Alg. 1, randomness, coverage."""

import numpy as np
import pytest

from prmim_jax import masking

THROWING = ("random_throw", "furthest", "furthest_seeded")


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


@pytest.mark.parametrize("sampler", THROWING)
def test_visible_tokens_are_maes_for_the_same_noise(sampler):
    layout = masking.TokenLayout((14, 14), 0.75, 0.5)
    noise = noise_for(8, layout)
    mae_ids = masking.sample("random", noise, masking.TokenLayout((14, 14), 0.75))
    ids = masking.sample(sampler, noise, layout)
    np.testing.assert_array_equal(ids.visible, mae_ids.visible)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids.decoded, ids.thrown], 1)), np.sort(mae_ids.decoded))


@pytest.mark.parametrize("sampler", THROWING)
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
