"""The grain data pipeline: sources, decoding, augmentation, token sets, sharding over processes, resume."""

import gzip
import json
import pathlib

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from prmim_jax import masking
from prmim_jax.data import data_config, eval_dataset, local_batch_size, pretrain_dataset, sources, transforms

LAYOUT_28 = masking.TokenLayout((14, 14), 0.75, 0.5)  # patch 2 on 28x28
TINY_TRAIN, TINY_TEST = 12, 5


def write_idx(path: pathlib.Path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> pathlib.Path:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture(scope="module")
def tiny_fashion_dir(tmp_path_factory):
    """Fashion-MNIST's file layout with 12 training and 5 test images; image i is filled with value i."""
    directory = tmp_path_factory.mktemp("fashion")
    for prefix, count in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        images = np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None], (count, 28, 28)).copy()
        images[:, 0, :5] = 255  # an asymmetric mark, so flips show
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8) % 10)
    return directory


def tiny_config(directory, **overrides):
    return data_config(path=str(directory), **overrides)


def take(ds_or_iterator, count):
    iterator = iter(ds_or_iterator)
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)


# --- IDX files and Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype, type_code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)])
def test_read_idx_returns_the_array_that_was_written(tmp_path, compress, dtype, type_code):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    path = write_idx(tmp_path / "x-idx3", array, type_code, compress)
    read = sources.read_idx(path)
    np.testing.assert_array_equal(read, array)
    assert read.dtype == dtype


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x00\x00", "truncated"),
        (b"\x00\x01\x08\x01" + b"\x00\x00\x00\x02" + b"ab", "not an IDX file"),
        (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x02" + b"ab", "not an IDX file"),
        (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"ab", "truncated IDX file"),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x01" + b"ab", "trailing bytes"),
        # mtime=0: the bytes (and so the test id) must not depend on when they were made (xdist
        # workers collect separately and must agree).
        (gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x08" + bytes(8), mtime=0)[:-6], "gzip"),
    ],
    ids=["too short", "bad magic", "bad type", "short header", "short data", "trailing bytes", "truncated gzip"],
)
def test_corrupt_or_truncated_idx_files_raise_value_errors_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as error:
        sources.read_idx(path)
    assert str(path) in str(error.value)


def test_fashion_mnist_source_reads_idx_files_and_checks_them(tmp_path, tiny_fashion_dir):
    source = sources.FashionMnistSource(tiny_fashion_dir, "test")
    assert len(source) == TINY_TEST
    item = source[3]
    assert item["image"].shape == (28, 28, 1) and item["image"].dtype == np.uint8
    assert item["image"][5, 5, 0] == 3 and item["label"] == 3
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        sources.FashionMnistSource(tmp_path, "train")
    with pytest.raises(ValueError, match="splits"):
        sources.FashionMnistSource(tiny_fashion_dir, "validation")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 images but"):
        len(sources.FashionMnistSource(tmp_path, "train"))


def test_debian_fashion_mnist_files_hold_the_full_dataset():
    directory = pathlib.Path(sources.FASHION_MNIST_DIR)
    if not (directory / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST is missing from {directory}: `apt-get install dataset-fashion-mnist` "
            "(Debian's package; .ci/run installs it)."
        )
    for split, size in sources.FASHION_MNIST_SIZES.items():
        images, labels = sources.FashionMnistSource(directory, split)._load()
        assert len(sources.FashionMnistSource(directory, split)) == size
        assert images.shape == (size, 28, 28, 1) and images.dtype == np.uint8
        assert set(np.unique(labels)) == set(range(10))
    train = sources.FashionMnistSource(directory, "train")._load()[0] / 255
    config = data_config()
    assert train.mean() == pytest.approx(config.mean[0], abs=1e-4)
    assert train.std() == pytest.approx(config.std[0], abs=1e-4)


# --- image folders and decoding ----------------------------------------------------------------


def save(image: Image.Image, path: pathlib.Path, **kwargs) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def rgb_image(height=30, width=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """``root/train/{cat,dog}/``: RGB JPEG, grayscale, RGBA, palette-with-transparency, CMYK, 16-bit PNGs."""
    root = tmp_path_factory.mktemp("folder")
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    save(rgb_image(seed=1), cat / "a_rgb.jpg", quality=95)
    save(rgb_image(seed=2).convert("L"), cat / "b_gray.png")
    save(rgb_image(seed=3).convert("RGBA"), cat / "c_rgba.png")
    palette = rgb_image(seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save(palette, dog / "a_palette.png", transparency=0)
    save(rgb_image(seed=5).convert("CMYK"), dog / "b_cmyk.jpg")
    gray16 = Image.fromarray((np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16))
    save(gray16, dog / "c_gray16.png")
    save(rgb_image(seed=6), dog / "D_UPPER.JPEG")
    (dog / "notes.txt").write_text("not an image")
    save(rgb_image(seed=7), root / "val" / "cat" / "v.png")
    return root


def test_image_folder_source_sorts_classes_and_files_and_keeps_paths(image_root):
    source = sources.ImageFolderSource(image_root / "train")
    assert source.classes == ["cat", "dog"]
    names = [pathlib.Path(source[i]["image"]).name for i in range(len(source))]
    # Byte order within a class, as sorted() on paths: upper case first; notes.txt skipped.
    assert names == [
        "a_rgb.jpg",
        "b_gray.png",
        "c_rgba.png",
        "D_UPPER.JPEG",
        "a_palette.png",
        "b_cmyk.jpg",
        "c_gray16.png",
    ]
    assert [source[i]["label"] for i in range(len(source))] == [0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.ImageFolderSource(image_root / "missing")
    with pytest.raises(ValueError, match="holds no"):
        sources.ImageFolderSource(image_root / "train" / "cat")


@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_mode_decodes_to_the_requested_channels(image_root, channels):
    source = sources.ImageFolderSource(image_root / "train")
    for index in range(len(source)):
        image = transforms.decode_image(source[index]["image"], channels)
        assert image.shape == (30, 40, channels) and image.dtype == np.uint8, source[index]["image"]
    gray16 = transforms.decode_image(str(image_root / "train" / "dog" / "c_gray16.png"), 1)
    assert gray16.max() > 200  # rescaled from 16 bits, not clipped to 255 everywhere
    assert len(np.unique(gray16)) > 100


def test_decoding_matches_pillow_for_rgb_and_drops_alpha(image_root):
    rgba_path = image_root / "train" / "cat" / "c_rgba.png"
    expected = np.asarray(Image.open(rgba_path).convert("RGB"))
    np.testing.assert_array_equal(transforms.decode_image(str(rgba_path), 3), expected)
    as_bytes = transforms.decode_image(rgba_path.read_bytes(), 3)
    np.testing.assert_array_equal(as_bytes, expected)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    np.testing.assert_array_equal(transforms.decode_image(gray, 3), np.repeat(gray, 3, -1))
    rgb = np.asarray(rgb_image())
    np.testing.assert_array_equal(
        transforms.decode_image(rgb, 1)[..., 0], np.asarray(Image.fromarray(rgb).convert("L"))
    )


def test_corrupt_images_raise_errors_naming_the_file(tmp_path):
    good = save(rgb_image(), tmp_path / "train" / "c" / "good.png")
    garbage = tmp_path / "train" / "c" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "train" / "c" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (garbage, truncated):
        with pytest.raises(transforms.CorruptImageError, match="cannot decode") as error:
            transforms.decode_image(str(path), 3)
        assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError):
        transforms.decode_image(str(tmp_path / "gone.jpg"), 3)
    with pytest.raises(transforms.CorruptImageError, match="18 bytes"):
        transforms.decode_image(b"this is not a jpeg", 3)
    bad = transforms.find_corrupt_images(sources.ImageFolderSource(tmp_path / "train"))
    assert [index for index, _ in bad] == [0, 2]
    config = data_config(source="image_folder", path=str(tmp_path), image_size=16, eval_split="train")
    with pytest.raises(transforms.CorruptImageError, match=r"garbage\.jpg|truncated\.png"):
        list(eval_dataset(config, batch_size=3))


def test_image_folder_pipeline_gives_rgb_batches_at_the_image_size(image_root):
    config = data_config(source="image_folder", path=str(image_root), image_size=32)
    layout = masking.TokenLayout((4, 4), 0.75, 0.25)
    batch = take(pretrain_dataset(config, layout, "furthest", global_batch=4), 1)[0]
    assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.uint8  # normalised on device
    evaluated = list(eval_dataset(config, batch_size=2))
    assert len(evaluated) == 1 and evaluated[0]["mask"].tolist() == [True, False]


# --- TFDS ----------------------------------------------------------------------------------------


def test_tfds_source_and_pipelines_run_on_mock_data():
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.TfdsSource("imagenet2012", "train")
        item = source[0]
        assert len(source) == 10 and item.keys() == {"image", "label"}
        assert item["image"].dtype == np.uint8 and item["image"].shape[-1] == 3
        config = data_config(source="tfds", name="imagenet2012", image_size=32)
        layout = masking.TokenLayout((4, 4), 0.75, 0.5)
        batches = take(pretrain_dataset(config, layout, "furthest", global_batch=4), 3)
        evaluated = list(eval_dataset(config, "validation", batch_size=4))
    for batch in batches:
        assert batch["images"].shape == (4, 32, 32, 3)
        masking.check_token_ids(
            masking.TokenIds(batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"]), layout
        )
    assert [b["mask"].sum() for b in evaluated] == [4, 4, 2]
    assert all(b["images"].shape == (4, 32, 32, 3) for b in evaluated)


# --- transforms ----------------------------------------------------------------------------------


def test_random_resized_crop_boxes_follow_maes_scale_and_ratio():
    rng = np.random.default_rng(0)
    height, width = 375, 500
    boxes = np.array([transforms.random_resized_crop_box(rng, height, width) for _ in range(3000)])
    top, left, crop_h, crop_w = boxes.T
    area = crop_h * crop_w / (height * width)
    ratio = crop_w / crop_h
    assert (top >= 0).all() and (left >= 0).all() and (top + crop_h <= height).all() and (left + crop_w <= width).all()
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    assert area.min() < 0.22 and area.max() > 0.9  # the whole scale range is drawn
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    square = np.array([transforms.random_resized_crop_box(rng, 400, 400) for _ in range(2000)])
    assert 0.45 < np.mean(square[:, 3] > square[:, 2]) < 0.55  # log-uniform ratio: as many wide crops as tall


def test_random_resized_crop_falls_back_to_a_central_crop():
    rng = np.random.default_rng(0)
    assert transforms.random_resized_crop_box(rng, 10, 1000, scale=(0.9, 1.0)) == (0, 493, 10, 13)
    assert transforms.random_resized_crop_box(rng, 1000, 10, scale=(0.9, 1.0)) == (493, 0, 13, 10)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_happens_half_the_time_and_only_when_enabled(flip):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    crop = transforms.RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=flip)
    outputs = list(grain.MapDataset.source([{"image": image, "label": 0}] * 400).random_map(crop, seed=0))
    flipped = [np.array_equal(out["image"], image[:, ::-1]) for out in outputs]
    kept = [np.array_equal(out["image"], image) for out in outputs]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0.4 < np.mean(flipped) < 0.6 if flip else not any(flipped)


def test_eval_transform_is_maes_resize_and_center_crop_and_the_identity_at_28():
    image = np.asarray(rgb_image(375, 500))
    out = transforms.ResizeCenterCrop(224).map({"image": image})["image"]
    reference = Image.fromarray(image).resize((341, 256), Image.Resampling.BICUBIC).crop((58, 16, 282, 240))
    np.testing.assert_array_equal(out, np.asarray(reference))
    small = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    np.testing.assert_array_equal(transforms.ResizeCenterCrop(28, crop_pct=1.0).map({"image": small})["image"], small)


def test_normalize_gives_float32_standardised_pixels():
    normalize = transforms.Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    out = normalize.map({"image": np.full((2, 2, 3), 255, np.uint8)})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [1.0, 3.0, 1.0], rtol=1e-6)


# --- pretraining batches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, layout",
    [("random", masking.TokenLayout((14, 14), 0.75))]
    + [(name, LAYOUT_28) for name in ("random_throw", "furthest", "furthest_seeded")],
)
def test_pretrain_batches_have_static_shapes_and_ids_that_partition_the_grid(tiny_fashion_dir, sampler, layout):
    batches = take(pretrain_dataset(tiny_config(tiny_fashion_dir), layout, sampler, global_batch=8), 4)
    for batch in batches:
        assert batch["images"].shape == (8, 28, 28, 1) and batch["images"].dtype == np.uint8  # normalised on device
        assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
        ids = masking.TokenIds(batch["ids_visible"], batch["ids_decoded"], batch["ids_thrown"])
        assert all(a.dtype == np.int32 for a in ids)
        masking.check_token_ids(ids, layout)


def test_each_epoch_is_a_fresh_permutation_of_the_data(tiny_fashion_dir):
    batches = take(pretrain_dataset(tiny_config(tiny_fashion_dir), LAYOUT_28, "furthest", global_batch=12), 3)
    labels = [b["labels"].tolist() for b in batches]
    assert all(sorted(epoch) == sorted(np.arange(TINY_TRAIN) % 10) for epoch in labels)
    assert labels[0] != labels[1] or labels[1] != labels[2]


def test_same_seed_same_batches_other_seed_other_batches(tiny_fashion_dir):
    config = tiny_config(tiny_fashion_dir)
    first = take(pretrain_dataset(config, LAYOUT_28, "furthest", global_batch=4, seed=3), 3)
    again = take(pretrain_dataset(config, LAYOUT_28, "furthest", global_batch=4, seed=3), 3)
    other = take(pretrain_dataset(config, LAYOUT_28, "furthest", global_batch=4, seed=4), 3)
    for a, b in zip(first, again, strict=True):
        assert_batches_equal(a, b)
    assert not all(np.array_equal(a["ids_visible"], b["ids_visible"]) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_its_rows_of_the_single_process_global_batch(tiny_fashion_dir, process_count):
    config = tiny_config(tiny_fashion_dir)
    steps, global_batch = 4, 8  # 32 images: crosses two epoch boundaries of the 12-image set
    whole = take(pretrain_dataset(config, LAYOUT_28, "furthest", global_batch=global_batch), steps)
    local = global_batch // process_count
    for process in range(process_count):
        ds = pretrain_dataset(
            config,
            LAYOUT_28,
            "furthest",
            global_batch=global_batch,
            process_index=process,
            process_count=process_count,
        )
        for step, batch in enumerate(take(ds, steps)):
            rows = {key: value[process * local : (process + 1) * local] for key, value in whole[step].items()}
            assert_batches_equal(batch, rows)


def test_global_batch_must_split_evenly_over_processes(tiny_fashion_dir):
    config = tiny_config(tiny_fashion_dir)
    with pytest.raises(ValueError, match="use a multiple of 4"):
        pretrain_dataset(config, LAYOUT_28, "furthest", global_batch=10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="use a multiple of 3"):
        eval_dataset(config, batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        local_batch_size(8, process_index=2, process_count=2)


def test_bad_configs_fail_with_the_fix(tiny_fashion_dir):
    with pytest.raises(ValueError, match="unknown data config keys"):
        data_config(batch_size=8)
    with pytest.raises(ValueError, match="unknown data source"):
        data_config(source="lmdb")
    with pytest.raises(ValueError, match="one entry per channel"):
        data_config(channels=3)
    with pytest.raises(ValueError, match="unknown token sampler"):
        pretrain_dataset(tiny_config(tiny_fashion_dir), LAYOUT_28, "nearest", global_batch=4)
    with pytest.raises(ValueError, match="not divisible by the token grid"):
        pretrain_dataset(tiny_config(tiny_fashion_dir), masking.TokenLayout((5, 5), 0.75), "random", global_batch=4)


def test_resumed_iterator_yields_exactly_the_following_batches(tiny_fashion_dir):
    ds = pretrain_dataset(tiny_config(tiny_fashion_dir), LAYOUT_28, "furthest", global_batch=4)
    iterator = iter(ds)
    take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = take(iterator, 3)
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 3), strict=True):
        assert_batches_equal(a, b)


def test_worker_processes_give_the_same_batches_and_resume_exactly(tiny_fashion_dir):
    in_process = take(pretrain_dataset(tiny_config(tiny_fashion_dir), LAYOUT_28, "furthest", global_batch=4), 5)
    ds = pretrain_dataset(tiny_config(tiny_fashion_dir, num_workers=2), LAYOUT_28, "furthest", global_batch=4)
    iterator = iter(ds)
    try:
        first = take(iterator, 2)
        state = json.loads(json.dumps(iterator.get_state()))
    finally:
        iterator.close()
    resumed = iter(ds)
    try:
        resumed.set_state(state)
        rest = take(resumed, 3)
    finally:
        resumed.close()
    for a, b in zip(in_process, first + rest, strict=True):
        assert_batches_equal(a, b)


# --- evaluation batches --------------------------------------------------------------------------


def test_eval_is_one_unaugmented_pass_padded_to_static_batches(tiny_fashion_dir):
    config = tiny_config(tiny_fashion_dir)
    batches = list(eval_dataset(config, batch_size=4))
    assert len(batches) == 2 and all(b["images"].shape == (4, 28, 28, 1) for b in batches)
    assert np.concatenate([b["mask"] for b in batches]).tolist() == [True] * 5 + [False] * 3
    assert np.concatenate([b["labels"] for b in batches])[:5].tolist() == list(range(5))
    source = sources.FashionMnistSource(tiny_fashion_dir, "test")
    np.testing.assert_array_equal(batches[1]["images"][0], source[4]["image"])  # uint8 pixels, as read
    again = list(eval_dataset(config, batch_size=4))
    for a, b in zip(batches, again, strict=True):
        assert_batches_equal(a, b)


def test_eval_processes_read_their_rows_of_each_global_batch(tiny_fashion_dir):
    config = tiny_config(tiny_fashion_dir)
    whole = list(eval_dataset(config, batch_size=4))
    parts = [list(eval_dataset(config, batch_size=4, process_index=p, process_count=2)) for p in range(2)]
    for step, batch in enumerate(whole):
        for process in range(2):
            rows = {key: value[process * 2 : (process + 1) * 2] for key, value in batch.items()}
            assert_batches_equal(parts[process][step], rows)
