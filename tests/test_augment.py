"""MAE's fine-tuning augmentations: RandAugment, random erasing, mixup / cutmix, label smoothing, fine-tuning batches."""

import functools
import gzip
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image, ImageEnhance

from prmim_jax import masking, mixing
from prmim_jax.data import augment, pipeline, schema

MAE_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
TINY_TRAIN = 10


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def noise_fashion_dir(tmp_path_factory):
    """Fashion-MNIST's file layout with 10 training and 2 test images of uniform noise; labels 0..9."""
    directory = tmp_path_factory.mktemp("fashion_noise")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", TINY_TRAIN), ("t10k", 2)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return directory


def finetune_config(directory, **overrides):
    values = dict(crop_scale=(0.08, 1.0), rand_augment=MAE_RAND_AUGMENT, random_erase_prob=0.25)
    return schema.data_config(path=str(directory), **(values | overrides))


def take(ds_or_iterator, count):
    iterator = iter(ds_or_iterator)
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)


def noise_image(channels, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def pil(image):
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def array(image, channels):
    return np.asarray(image).reshape(*image.size[::-1], channels)


# --- RandAugment ---------------------------------------------------------------------------------


def test_op_arguments_follow_timms_level_mappings():
    # Hand-computed from timm's LEVEL_TO_ARG at magnitude 9 (level 0.9) and 10.
    expected = {
        ("Rotate", 9, False): 27.0,
        ("Rotate", 9, True): -27.0,
        ("ShearX", 9, False): 0.27,
        ("ShearY", 10, True): -0.3,
        ("TranslateXRel", 9, False): 0.405,
        ("TranslateYRel", 10, True): -0.45,
        ("PosterizeIncreasing", 9, False): 1,  # 4 - int(3.6)
        ("PosterizeIncreasing", 10, False): 0,
        ("Posterize", 9, False): 3,
        ("SolarizeIncreasing", 9, False): 26,  # 256 - int(230.4)
        ("Solarize", 9, False): 230,
        ("SolarizeAdd", 9, False): 99,
        ("ColorIncreasing", 9, False): 1.81,
        ("ContrastIncreasing", 9, True): 0.19,
        ("BrightnessIncreasing", 10, True): 0.1,
        ("Sharpness", 9, False): 1.72,
        ("AutoContrast", 9, False): None,
        ("Equalize", 9, True): None,
        ("Invert", 9, False): None,
    }
    for (name, magnitude, negate), value in expected.items():
        argument = augment.op_argument(name, magnitude, negate)
        assert argument == pytest.approx(value, abs=1e-12) if value is not None else argument is None, name
        assert type(argument) is type(value), name
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        augment.op_argument("Cutout", 9)


@pytest.mark.parametrize("channels", [1, 3])
def test_ops_match_pillow_and_numpy_references(channels):
    image = noise_image(channels)
    fill = 128 if channels == 1 else (128,) * 3
    bicubic = Image.Resampling.BICUBIC
    affine = Image.Transform.AFFINE
    references = {
        ("Rotate", 9, False): pil(image).rotate(27.0, resample=bicubic, fillcolor=fill),
        ("Rotate", 9, True): pil(image).rotate(-27.0, resample=bicubic, fillcolor=fill),
        ("ShearX", 5, True): pil(image).transform((16, 16), affine, (1, -0.15, 0, 0, 1, 0), bicubic, fillcolor=fill),
        ("TranslateYRel", 10, False): pil(image).transform(
            (16, 16), affine, (1, 0, 0, 0, 1, 7.2), bicubic, fillcolor=fill
        ),
        ("BrightnessIncreasing", 9, False): ImageEnhance.Brightness(pil(image)).enhance(1.81),
    }
    for (name, magnitude, negate), reference in references.items():
        out = augment.augment_op(image, name, magnitude, negate=negate)
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, array(reference, channels), err_msg=name)
    pixels = image.astype(np.int32)
    arithmetic = {
        "Invert": 255 - pixels,
        "PosterizeIncreasing": pixels & 0x80,  # 1 bit kept at magnitude 9
        "SolarizeIncreasing": np.where(pixels >= 26, 255 - pixels, pixels),
        "SolarizeAdd": np.where(pixels < 128, np.minimum(255, pixels + 99), pixels),
    }
    for name, expected in arithmetic.items():
        np.testing.assert_array_equal(augment.augment_op(image, name, 9), expected, err_msg=name)


def test_geometric_ops_fill_uncovered_pixels_with_the_fill_value():
    black = np.zeros((16, 16, 3), np.uint8)
    assert augment.augment_op(black, "Rotate", 9)[0, 0].tolist() == [128, 128, 128]  # timm's default grey
    assert augment.augment_op(black, "Rotate", 9, fill=(124, 116, 104))[0, 0].tolist() == [124, 116, 104]
    assert augment.augment_op(black[..., :1], "TranslateXRel", 10, fill=73)[0, -1].tolist() == [73]
    with pytest.raises(ValueError, match="one value per channel"):
        augment.augment_op(black[..., :1], "Rotate", 9, fill=(124, 116, 104))


def rand_augmented(transform, images, seed=0):
    elements = [{"image": image, "label": index} for index, image in enumerate(images)]
    return [element["image"] for element in grain.MapDataset.source(elements).random_map(transform, seed=seed)]


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_is_deterministic_per_seed_and_element_and_keeps_shape_and_dtype(channels):
    transform = augment.RandAugment()
    images = [noise_image(channels)] * 12  # the same image everywhere: only the element index differs
    first, again = rand_augmented(transform, images), rand_augmented(transform, images)
    other_seed = rand_augmented(transform, images, seed=1)
    for a, b in zip(first, again, strict=True):
        assert a.shape == (16, 16, channels) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in first}) > 4  # elements get their own ops
    assert any(not np.array_equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_rand_augment_with_prob_zero_or_no_ops_is_the_identity():
    images = [noise_image(3, seed=seed) for seed in range(5)]
    for transform in (augment.RandAugment(prob=0.0), augment.RandAugment(num_ops=0)):
        for out, image in zip(rand_augmented(transform, images), images, strict=True):
            np.testing.assert_array_equal(out, image)


def test_rand_augment_with_the_paper_settings_changes_most_images():
    images = [noise_image(3, seed=seed) for seed in range(60)]
    outputs = rand_augmented(augment.rand_augment_from_string(MAE_RAND_AUGMENT), images)
    changed = np.mean([not np.array_equal(out, image) for out, image in zip(outputs, images, strict=True)])
    # Both ops skipped with probability 0.25, and a few ops leave noise images as they are (AutoContrast).
    assert 0.55 < changed < 0.95


def test_each_image_gets_one_listed_op_at_the_mapped_argument():
    image = noise_image(3)
    transform = augment.RandAugment(num_ops=1, prob=1.0, magnitude_std=0.0)
    candidates = {
        (name, negate): augment.augment_op(image, name, 9.0, negate=negate).tobytes()
        for name in augment.INCREASING_OPS
        for negate in (False, True)
    }
    seen = set()
    for out in rand_augmented(transform, [image] * 60):
        matches = {name for (name, _), candidate in candidates.items() if candidate == out.tobytes()}
        assert matches, "an output that no single op at magnitude 9 gives"
        seen |= matches
    assert len(seen) >= 10  # ops are drawn from the whole list


def test_rand_augment_strings_parse_to_timms_settings():
    mae = augment.rand_augment_from_string(MAE_RAND_AUGMENT)
    assert (mae.num_ops, mae.magnitude, mae.magnitude_std, mae.prob, mae.increasing) == (2, 9.0, 0.5, 0.5, True)
    assert mae.ops == augment.INCREASING_OPS
    plain = augment.rand_augment_from_string("rand-n3-mstd101", fill=(1, 2, 3))
    assert (plain.num_ops, plain.magnitude, plain.magnitude_std, plain.increasing) == (3, 10.0, np.inf, False)
    assert plain.ops == augment.OPS and plain.fill == (1, 2, 3)
    for bad in ("auto-m9", "rand-x9", "rand-m9-w0", "rand-mfoo", "rand-m9-mstd0.5-inc1-"):
        with pytest.raises(ValueError, match="RandAugment spec"):
            augment.rand_augment_from_string(bad)


# --- random erasing ------------------------------------------------------------------------------


def test_random_erasing_replaces_one_box_of_timms_size_range_by_unit_noise():
    image = np.full((64, 64, 3), 5.0, np.float32)
    erased = rand_augmented(augment.RandomErasing(prob=1.0), [image] * 200)
    fractions, noise = [], []
    for out in erased:
        assert out.shape == image.shape and out.dtype == np.float32
        mask = (out != 5.0).all(axis=-1)  # noise in every channel of an erased pixel
        assert ((out != 5.0).any(axis=-1) == mask).all()
        rows, cols = mask.any(axis=1), mask.any(axis=0)
        np.testing.assert_array_equal(mask, rows[:, None] & cols[None, :])  # one rectangle
        fractions.append(mask.mean())
        noise.append(out[mask])
    fractions = np.array(fractions)
    # Area fraction uniform in [0.02, 1/3]; sides are rounded to whole pixels.
    assert fractions.min() > 0.015 and fractions.max() < 0.36
    assert fractions.min() < 0.05 and fractions.max() > 0.28
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    assert all(np.array_equal(out, image) for out in rand_augmented(augment.RandomErasing(prob=0.0), [image] * 20))


def test_random_erasing_happens_with_its_probability():
    image = np.zeros((32, 32, 1), np.float32)
    erased = [not np.array_equal(out, image) for out in rand_augmented(augment.RandomErasing(0.25), [image] * 400)]
    assert 0.18 < np.mean(erased) < 0.32
    with pytest.raises(ValueError, match="prob"):
        augment.RandomErasing(prob=1.5)


# --- mixup / cutmix ------------------------------------------------------------------------------


def test_smoothed_targets_are_timms_exact_values():
    targets = mixing.smooth_targets(jnp.array([2, 0], jnp.int32), 10, 0.1)
    assert targets.shape == (2, 10) and targets.dtype == jnp.float32
    expected = np.full((2, 10), np.float32(0.01))
    expected[0, 2] = expected[1, 0] = np.float32(0.91)
    np.testing.assert_array_equal(targets, expected)
    np.testing.assert_array_equal(mixing.smooth_targets(jnp.array([1]), 3, 0.0), [[0.0, 1.0, 0.0]])


def distinct_batch(batch=8, size=6, channels=2):
    """Image ``i`` holds ``i`` + small noise, so every image differs from its reversed partner at every pixel."""
    noise = np.random.default_rng(0).uniform(0, 0.1, (batch, size, size, channels))
    images = jnp.asarray(np.arange(batch)[:, None, None, None] + noise, jnp.float32)
    return images, jnp.arange(batch, dtype=jnp.int32)  # labels differ from their partners' too


def test_mixed_targets_are_probability_vectors_mixing_the_label_and_its_partner():
    images, labels = distinct_batch()
    for seed in range(10):
        mixed, targets = mixing.mix_batch(jax.random.key(seed), images, labels, 10)
        assert mixed.shape == images.shape and mixed.dtype == jnp.float32
        assert targets.shape == (8, 10) and targets.dtype == jnp.float32
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        assert (targets >= 0.01 - 1e-7).all()  # label smoothing 0.1 over 10 classes
        lam = (targets[0, 0] - 0.01) / 0.9  # image 0's own-label weight is 0.01 + 0.9 lam
        np.testing.assert_allclose(targets[:, labels[::-1]].diagonal(), 0.01 + 0.9 * (1 - lam), atol=1e-6)


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    images, labels = distinct_batch()
    lams = []
    for seed in range(6):
        mixed, targets = mixing.mix_batch(
            jax.random.key(seed), images, labels, 8, cutmix_alpha=0.0, label_smoothing=0.0
        )
        lam = np.asarray(targets)[np.arange(8), labels]
        np.testing.assert_allclose(lam, lam[0], rtol=1e-6)  # one lambda for the batch
        expected = lam[0] * images + (1 - lam[0]) * images[::-1]
        np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-5)
        lams.append(lam[0])
    assert min(lams) > 0 and max(lams) < 1 and np.ptp(lams) > 0.05


def test_cutmix_pastes_one_box_from_the_partner_and_weights_targets_by_the_unpasted_area():
    images, labels = distinct_batch(size=16)
    sizes = []
    for seed in range(8):
        mixed, targets = mixing.mix_batch(jax.random.key(seed), images, labels, 8, mixup_alpha=0.0, label_smoothing=0.0)
        mixed, pasted = np.asarray(mixed), np.asarray(mixed != images)
        box = pasted[0, :, :, 0]
        assert (pasted == box[None, :, :, None]).all()  # the same box in every image and channel
        np.testing.assert_array_equal(box, box.any(axis=1)[:, None] & box.any(axis=0)[None, :])
        np.testing.assert_array_equal(mixed[pasted], np.asarray(images[::-1])[pasted])
        np.testing.assert_allclose(np.asarray(targets)[np.arange(8), labels], 1 - box.mean(), atol=1e-6)
        sizes.append(box.sum())
    assert len(set(sizes)) > 3


def test_cutmix_box_is_timms_rand_bbox():
    # lam = 0.75: sides int(16 * 0.5) = 8, half 4, so an unclipped box is 8 x 8 and a clipped one smaller.
    for seed in range(20):
        box, corrected = mixing.cutmix_box(jax.random.key(seed), jnp.float32(0.75), 16, 16)
        box = np.asarray(box)
        heights, widths = box.any(axis=1).sum(), box.any(axis=0).sum()
        assert 4 <= heights <= 8 and 4 <= widths <= 8 and box.sum() == heights * widths
        assert float(corrected) == pytest.approx(1 - box.mean())


def test_switch_prob_picks_cutmix_or_mixup_and_prob_zero_only_smooths():
    images, labels = distinct_batch()
    kinds = set()
    for seed in range(12):
        mixed, _ = mixing.mix_batch(jax.random.key(seed), images, labels, 10)
        partner_or_own = np.isclose(mixed, images) | np.isclose(mixed, images[::-1])
        kinds.add("cutmix" if partner_or_own.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}
    mixed, targets = mixing.mix_batch(jax.random.key(0), images, labels, 10, prob=0.0)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, mixing.smooth_targets(labels, 10, 0.1))
    with pytest.raises(ValueError, match="one > 0"):
        mixing.mix_batch(jax.random.key(0), images, labels, 10, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="switch_prob"):
        mixing.mix_batch(jax.random.key(0), images, labels, 10, switch_prob=2.0)


def test_mix_batch_jits_on_a_batch_sharded_over_eight_devices():
    assert jax.device_count() == 8
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    images, labels = distinct_batch(batch=16)
    mix = jax.jit(functools.partial(mixing.mix_batch, num_classes=16))
    sharded_images, sharded_labels = jax.device_put(images, sharding), jax.device_put(labels, sharding)
    for seed in range(4):
        mixed, targets = mix(jax.random.key(seed), sharded_images, sharded_labels)
        assert len(mixed.sharding.device_set) == 8
        expected_images, expected_targets = mixing.mix_batch(jax.random.key(seed), images, labels, 16)
        np.testing.assert_allclose(mixed, expected_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(targets, expected_targets, rtol=1e-6, atol=1e-7)


# --- fine-tuning batches -------------------------------------------------------------------------


def test_augmentation_keys_are_off_by_default_and_checked():
    config = schema.data_config()
    assert config.rand_augment is None and config.random_erase_prob == 0.0
    assert tuple(config.crop_scale) == (0.2, 1.0)  # pretraining's; fine-tuning configs set (0.08, 1.0)
    with pytest.raises(ValueError, match=r"data\.rand_augment.*'rand-m9-mtsd0\.5'"):
        schema.data_config(rand_augment="rand-m9-mtsd0.5")
    with pytest.raises(ValueError, match=r"random_erase_prob=1\.5 must lie in \[0, 1\]"):
        schema.data_config(random_erase_prob=1.5)


def test_finetune_batches_have_the_documented_shapes(noise_fashion_dir):
    batches = take(pipeline.finetune_dataset(finetune_config(noise_fashion_dir), global_batch=4), 3)
    for batch in batches:
        assert batch.keys() == {"images", "labels"}
        assert batch["images"].shape == (4, 28, 28, 1) and batch["images"].dtype == np.float32
        assert batch["labels"].shape == (4,) and batch["labels"].dtype == np.int32
    labels = np.concatenate([b["labels"] for b in batches])[:TINY_TRAIN]
    assert sorted(labels.tolist()) == list(range(TINY_TRAIN))  # the first epoch: every image once


def test_without_augmentations_finetune_images_are_the_pretraining_crops(noise_fashion_dir):
    plain = schema.data_config(path=str(noise_fashion_dir))
    finetune = take(pipeline.finetune_dataset(plain, global_batch=4), 2)
    layout = masking.TokenLayout((14, 14), 0.75)
    pretrain = take(pipeline.pretrain_dataset(plain, layout, "random", global_batch=4), 2)
    augmented = take(pipeline.finetune_dataset(finetune_config(noise_fashion_dir), global_batch=4), 2)
    for a, b, c in zip(finetune, pretrain, augmented, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], c["labels"])  # augmentations do not change the order
    assert any(not np.array_equal(a["images"], c["images"]) for a, c in zip(finetune, augmented, strict=True))


def test_finetune_iterator_resumes_exactly(noise_fashion_dir):
    ds = pipeline.finetune_dataset(finetune_config(noise_fashion_dir, random_erase_prob=1.0), global_batch=4)
    iterator = iter(ds)
    take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = take(iterator, 3)
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 3), strict=True):
        assert_batches_equal(a, b)


def test_each_process_reads_its_rows_of_the_single_process_finetune_batch(noise_fashion_dir):
    config = finetune_config(noise_fashion_dir, random_erase_prob=0.5)
    whole = take(pipeline.finetune_dataset(config, global_batch=8), 3)  # 24 images: crosses two epochs
    for process in range(2):
        ds = pipeline.finetune_dataset(config, global_batch=8, process_index=process, process_count=2)
        for step, batch in enumerate(take(ds, 3)):
            rows = {key: value[process * 4 : (process + 1) * 4] for key, value in whole[step].items()}
            assert_batches_equal(batch, rows)
    with pytest.raises(ValueError, match="use a multiple of 2"):
        pipeline.finetune_dataset(config, global_batch=5, process_count=2)


def test_every_op_accepts_the_whole_magnitude_range():
    # N(9, 0.5) reaches the clip at 10, where PosterizeIncreasing keeps 0 bits (timm: a black image).
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
    for name in augment.INCREASING_OPS:
        for magnitude in (0.0, 5.0, 10.0):
            out = augment.augment_op(image, name, magnitude)
            assert out.shape == image.shape and out.dtype == np.uint8, name
    np.testing.assert_array_equal(augment.augment_op(image, "PosterizeIncreasing", 10.0), 0)
