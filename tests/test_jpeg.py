"""The fast host path for photographs: simplejpeg decoding, OpenCV's antialiased crops, uint8 batches, TFDS bytes.

The photographs are scikit-image's samples cut to ImageNet's typical 500x375 and saved as JPEG quality 90,
as an ImageNet training image is: natural content decodes and resamples unlike synthetic noise.
"""

import functools
import io
import tempfile

import cv2
import grain
import jax
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from prmim_jax import masking
from prmim_jax.data import data_config, eval_dataset, finetune_dataset, pretrain_dataset, sources, transforms

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
LAYOUT_32 = masking.TokenLayout((4, 4), 0.75, 0.5)


def photograph(name: str, width: int = 500, height: int = 375) -> Image.Image:
    """scikit-image's sample ``name``: its largest central ``width:height`` crop, resized to ``width x height`` RGB."""
    pixels = getattr(skimage.data, name)()
    full_h, full_w = pixels.shape[:2]
    fit = min(full_w / width, full_h / height)
    crop_w, crop_h = round(width * fit), round(height * fit)
    left, top = (full_w - crop_w) // 2, (full_h - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return Image.fromarray(pixels).convert("RGB").crop(box).resize((width, height), Image.Resampling.LANCZOS)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **({"quality": 90} | options))
    return buffer.getvalue()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def take(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """``root/{train,val}/photos/<name>.jpg``: the photographs at 500x375, JPEG quality 90."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        (root / split / "photos").mkdir(parents=True)
        for name in PHOTOS:
            (root / split / "photos" / f"{name}.jpg").write_bytes(jpeg_bytes(photograph(name)))
    return root


@pytest.fixture(scope="module")
def photo_paths(photo_root):
    return sorted(str(path) for path in (photo_root / "train" / "photos").iterdir())


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(subsampling=0), dict(subsampling=1), dict(subsampling=2), dict(subsampling=2, progressive=True)],
    ids=["4:4:4", "4:2:2", "4:2:0", "progressive"],
)
def test_simplejpeg_decodes_photographs_to_pillows_exact_pixels(tmp_path, options):
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(photograph("coffee", 160, 120), **options))
    fast = transforms._decode_ycbcr_jpeg(path.read_bytes())
    assert fast is not None  # simplejpeg, not Pillow, decoded it
    with Image.open(path) as opened:
        np.testing.assert_array_equal(fast, np.asarray(opened.convert("RGB")))
    np.testing.assert_array_equal(transforms.decode_image(str(path), 3), fast)
    np.testing.assert_array_equal(transforms.decode_image(path.read_bytes(), 3, jpeg_decoder="pillow"), fast)


@pytest.mark.parametrize("mode, suffix", [("L", "jpg"), ("CMYK", "jpg"), ("RGB", "png")])
@pytest.mark.parametrize("channels", [1, 3])
def test_images_that_simplejpeg_leaves_alone_decode_as_pillow_decodes_them(tmp_path, mode, suffix, channels):
    path = tmp_path / f"photo.{suffix}"
    photograph("astronaut", 64, 48).convert(mode).save(path)
    if suffix == "jpg":
        assert transforms._decode_ycbcr_jpeg(path.read_bytes()) is None  # grayscale and CMYK go to Pillow
    decoded = transforms.decode_image(str(path), channels)
    np.testing.assert_array_equal(decoded, transforms.decode_image(str(path), channels, jpeg_decoder="pillow"))
    assert decoded.shape == (48, 64, channels) and decoded.dtype == np.uint8


def test_truncated_or_garbled_jpegs_raise_corrupt_image_errors_naming_the_file(tmp_path):
    photo = jpeg_bytes(photograph("rocket", 96, 72))
    truncated, garbled = tmp_path / "truncated.jpg", tmp_path / "garbled.jpg"
    truncated.write_bytes(photo[: len(photo) // 2])  # the header intact, the scan cut
    garbled.write_bytes(photo[:2] + b"not a jpeg after its start marker")
    for path in (truncated, garbled):
        for decoder in transforms.JPEG_DECODERS:
            with pytest.raises(transforms.CorruptImageError, match="cannot decode") as error:
                transforms.decode_image(str(path), 3, decoder)
            assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="jpeg_decoder='turbo'"):
        transforms.DecodeImage(3, "turbo")


def test_without_simplejpeg_and_opencv_pillow_decodes_and_resizes_everything(monkeypatch, photo_paths):
    image = transforms.decode_image(photo_paths[0], 3)
    box = (40, 60, 300, 280)
    expected = transforms.resized_crop(image, box, 224, "pillow", flip=True)
    monkeypatch.setattr(transforms, "_simplejpeg", lambda: None)
    monkeypatch.setattr(transforms, "_opencv", lambda: None)
    np.testing.assert_array_equal(transforms.decode_image(photo_paths[0], 3), image)
    np.testing.assert_array_equal(transforms.resized_crop(image, box, 224, "opencv", flip=True), expected)


# --- crops ---------------------------------------------------------------------------------------


def test_opencv_crops_are_closer_to_pillows_than_jpeg_quality_90_is_to_the_photograph(photo_paths):
    """The faithfulness bar: every OpenCV crop is nearer Pillow's antialiased bicubic crop of the same box (PSNR)
    than the JPEG file is to the photograph it encodes, i.e. below the noise every ImageNet pixel already carries.

    Boxes from MAE's fine-tuning scale range (0.08, 1): downscales up to ~2x and upscales both. Plain cubic
    interpolation without the low-pass (OpenCV's resize as such) aliases and fails the same bar.
    """
    rng = np.random.default_rng(0)
    jpeg_noise, fast, aliased = [], [], []
    for path, name in zip(photo_paths, sorted(PHOTOS), strict=True):
        image = transforms.decode_image(path, 3)
        jpeg_noise.append(psnr(image, np.asarray(photograph(name))))
        for _ in range(8):
            box = transforms.random_resized_crop_box(rng, *image.shape[:2], scale=(0.08, 1.0))
            reference = transforms.resized_crop(image, box, 224, "pillow")
            fast.append(psnr(transforms.resized_crop(image, box, 224, "opencv"), reference))
            top, left, height, width = box
            cut = image[top : top + height, left : left + width]
            aliased.append(psnr(cv2.resize(cut, (224, 224), interpolation=cv2.INTER_CUBIC), reference))
    bar = max(jpeg_noise)  # 40.4 dB (chelsea) when written; 34-40 dB over the six photographs
    assert min(fast) > bar, (min(fast), bar)  # 45.5 dB when written
    assert np.median(fast) > 48  # 50.6 dB when written
    assert min(aliased) < bar  # 34.7 dB when written: the bar tells an aliasing resize


@pytest.mark.parametrize("size", [16, 64])
def test_random_crops_draw_the_same_boxes_and_flips_with_either_resampler(photo_paths, size):
    elements = [{"image": transforms.decode_image(path, 3), "label": 0} for path in photo_paths] * 2

    def crops(resampler, flip=True):
        crop = transforms.RandomResizedCropFlip(size, flip=flip, resampler=resampler)
        return [element["image"] for element in grain.MapDataset.source(elements).random_map(crop, seed=3)]

    references = crops("pillow")
    for fast, reference in zip(crops("opencv"), references, strict=True):
        assert fast.shape == reference.shape == (size, size, 3) and fast.dtype == np.uint8
        assert fast.flags.c_contiguous
        assert psnr(fast, reference) > 40
        assert psnr(fast, reference) > psnr(fast, reference[:, ::-1]) + 3  # flipped together, or not at all
    flipped = [not np.array_equal(a, b) for a, b in zip(references, crops("pillow", flip=False), strict=True)]
    assert 0 < sum(flipped) < len(elements)  # both flipped and unflipped crops were compared


def test_grayscale_and_upscaled_crops_keep_one_channel_and_stay_faithful():
    gray = np.asarray(photograph("astronaut").convert("L"))[..., None]
    for box, size in (((10, 20, 100, 120), 224), ((0, 0, 375, 500), 28), ((100, 100, 30, 30), 28)):
        fast = transforms.resized_crop(gray, box, size, "opencv")
        assert fast.shape == (size, size, 1)
        assert psnr(fast, transforms.resized_crop(gray, box, size, "pillow")) > 40


# --- uint8 batches, normalised on device ---------------------------------------------------------


def test_normalize_images_on_device_equals_the_host_normalize():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 255, 128)
    host = np.stack([transforms.Normalize(mean, std).map({"image": image})["image"] for image in pixels])
    device = jax.jit(functools.partial(transforms.normalize_images, mean=mean, std=std))(pixels)
    assert device.dtype == np.float32 and device.shape == pixels.shape
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(transforms.normalize_images(host, mean, std), host)  # already normalised
    with pytest.raises(TypeError, match="int32"):
        transforms.normalize_images(pixels.astype(np.int32), mean, std)
    with pytest.raises(ValueError, match="one entry per channel"):
        transforms.normalize_images(pixels, mean[:1], std[:1])


def photo_config(photo_root, **overrides):
    return data_config(source="image_folder", path=str(photo_root), image_size=32, **overrides)


def test_uint8_batches_normalised_on_device_are_the_host_normalised_batches(photo_root):
    uint8_config, host_config = photo_config(photo_root), photo_config(photo_root, device_normalize=False)
    assert uint8_config.device_normalize and uint8_config.crop_resampler == "opencv"
    mean, std = tuple(uint8_config.mean), tuple(uint8_config.std)
    pretrain = [
        take(pretrain_dataset(c, LAYOUT_32, "furthest", global_batch=4), 2) for c in (uint8_config, host_config)
    ]
    evaluate = [list(eval_dataset(c, batch_size=4)) for c in (uint8_config, host_config)]
    for uint8_batches, host_batches in (pretrain, evaluate):
        for pixels, normalised in zip(uint8_batches, host_batches, strict=True):
            assert pixels["images"].dtype == np.uint8 and normalised["images"].dtype == np.float32
            np.testing.assert_allclose(
                transforms.normalize_images(pixels["images"], mean, std), normalised["images"], rtol=0, atol=1e-6
            )
            for key in pixels.keys() - {"images"}:
                np.testing.assert_array_equal(pixels[key], normalised[key], err_msg=key)
    # Random erasing works on normalised pixels: with it, fine-tuning batches come normalised from the host.
    erased = take(finetune_dataset(photo_config(photo_root, random_erase_prob=0.5), global_batch=4), 1)[0]
    assert erased["images"].dtype == np.float32


def test_the_jpeg_decoder_never_changes_a_batch(photo_root):
    batches = [
        take(pretrain_dataset(photo_config(photo_root, jpeg_decoder=d), LAYOUT_32, "random_throw", global_batch=4), 3)
        for d in transforms.JPEG_DECODERS
    ]
    for fast, pillow in zip(*batches, strict=True):
        for key in fast:
            np.testing.assert_array_equal(fast[key], pillow[key], err_msg=key)


def test_resampler_defaults_per_source_and_bad_choices_fail_with_the_options():
    assert data_config(source="image_folder", path="/data").crop_resampler == "opencv"
    assert data_config(source="tfds").crop_resampler == "opencv"
    assert data_config().crop_resampler == "pillow"  # Fashion-MNIST: 28x28 crops, Pillow's exact ones
    with pytest.raises(ValueError, match=r"crop_resampler='cv2'.*\('opencv', 'pillow'\)"):
        data_config(crop_resampler="cv2")
    with pytest.raises(ValueError, match=r"jpeg_decoder='turbo'.*\('simplejpeg', 'pillow'\)"):
        data_config(jpeg_decoder="turbo")


# --- TFDS ----------------------------------------------------------------------------------------


class PrmimTinyPhotos(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset stored as ArrayRecord files, made here: 6 photographs at 64x48 as JPEG, labels 0 and 1."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
        )
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, name in enumerate(PHOTOS):
            # JPEG bytes go into the files as they are (TFDS would need TensorFlow to encode arrays).
            yield index, {"image": jpeg_bytes(photograph(name, 64, 48)), "label": index % 2}


class PrmimTinyArrays(tfds.core.GeneratorBasedBuilder):
    """As ``PrmimTinyPhotos`` with the images stored as uint8 tensors ``[8, 8, 3]`` (raw bytes), not image files.

    Under ``SkipDecoding`` TFDS would hand over those raw bytes, which no image decoder can read.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
        )
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(3):
            yield index, {"image": np.full((8, 8, 3), 10 * index, np.uint8), "label": index % 2}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    for builder_class in (PrmimTinyPhotos, PrmimTinyArrays):
        builder_class.pkg_dir_path = tfds.core.Path(tempfile.mkdtemp())  # no checksums or metadata to read
        builder = builder_class(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        )
    return data_dir


def test_tfds_source_hands_the_stored_jpeg_bytes_to_the_fast_decoder(tfds_dir):
    source = sources.TfdsSource("prmim_tiny_photos", "train", str(tfds_dir))
    item = source[1]
    assert len(source) == len(PHOTOS) and item.keys() == {"image", "label"}
    assert isinstance(item["image"], bytes) and transforms._decode_ycbcr_jpeg(item["image"]) is not None
    decoded_by_tfds = tfds.data_source("prmim_tiny_photos", split="train", data_dir=str(tfds_dir))[1]["image"]
    np.testing.assert_array_equal(transforms.decode_image(item["image"], 3), decoded_by_tfds)
    config = data_config(source="tfds", name="prmim_tiny_photos", data_dir=str(tfds_dir), image_size=32)
    batches = take(pretrain_dataset(config, LAYOUT_32, "furthest", global_batch=4), 2)
    assert all(batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.uint8 for batch in batches)
    evaluated = list(eval_dataset(config, "train", batch_size=4))
    assert [batch["mask"].sum() for batch in evaluated] == [4, 2]


def test_tfds_image_tensors_that_are_not_image_files_come_decoded(tfds_dir):
    source = sources.TfdsSource("prmim_tiny_arrays", "train", str(tfds_dir))
    np.testing.assert_array_equal(source[2]["image"], np.full((8, 8, 3), 20, np.uint8))
    assert source[2]["label"] == 0
