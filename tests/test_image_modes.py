"""Every Pillow mode decodes to the right uint8 pixels; nothing wraps, clips or zeroes silently.

Each case writes a tiny picture in one mode to the format that stores that mode losslessly (PNG for most, TIFF
for CMYK, YCbCr, PA and the 16-bit, 32-bit and float modes) and compares ``decode_image``'s output with the
pixels the mode means, computed here from the values written.
"""

import numpy as np
import pytest
from PIL import Image

from prmim_jax.data import sources, transforms

GRAY = np.array([[0, 1, 127, 128], [200, 254, 255, 37]], np.uint8)
RGB = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [12, 34, 56]], [[0, 0, 0], [255, 255, 255], [90, 80, 70], [1, 2, 3]]],
    np.uint8,
)
PALETTE = np.array([[10, 20, 30], [200, 100, 50], [0, 0, 0], [255, 255, 255]], np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
# 16-bit samples around the rounding boundaries of v * 255 / 65535 (= v / 257): 128 -> 0, 129 -> 1, ...
UINT16 = np.array([[0, 128, 129, 257], [32896, 65407, 65408, 65535]], np.uint16)
FLOATS = np.array([[0.0, 0.01, 0.123, 0.2], [0.4, 0.6, 0.99, 1.0]], np.float32)


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def scaled_16_bit(values: np.ndarray) -> np.ndarray:
    """The 8-bit pixels of 16-bit samples: their fraction of 65535, times 255, rounded (no ties exist)."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def palette_image(mode: str = "P") -> Image.Image:
    image = Image.new(mode, INDICES.shape[::-1])
    image.putpalette(PALETTE.ravel().tolist())
    if mode == "PA":
        image.putdata([(int(i), 255 * (n % 2)) for n, i in enumerate(INDICES.ravel())])
    else:
        image.putdata(INDICES.ravel().tolist())
    return image


# mode -> (picture, file suffix, the RGB pixels it means)
CASES = {
    "1": (Image.fromarray(GRAY > 127), ".png", gray_rgb(np.where(GRAY > 127, 255, 0).astype(np.uint8))),
    "L": (Image.fromarray(GRAY), ".png", gray_rgb(GRAY)),
    "LA": (Image.fromarray(np.stack([GRAY, 255 - GRAY], -1), "LA"), ".png", gray_rgb(GRAY)),
    "P": (palette_image(), ".png", PALETTE[INDICES]),
    "P with transparency": (palette_image(), ".png", PALETTE[INDICES]),  # saved with transparency=0
    "PA": (palette_image("PA"), ".tif", PALETTE[INDICES]),
    "RGB": (Image.fromarray(RGB), ".png", RGB),
    "RGBA": (Image.fromarray(np.concatenate([RGB, 255 - RGB[..., :1]], -1), "RGBA"), ".png", RGB),
    "CMYK": (
        Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0], [0, 255, 0, 0]]], np.uint8), "CMYK"),
        ".tif",
        np.array([[[0, 255, 255], [0, 0, 0], [255, 255, 255], [255, 0, 255]]], np.uint8),
    ),
    "YCbCr": (  # gray levels: Y with neutral chroma
        Image.fromarray(np.stack([GRAY, np.full_like(GRAY, 128), np.full_like(GRAY, 128)], -1), "YCbCr"),
        ".tif",
        gray_rgb(GRAY),
    ),
    "I;16": (Image.fromarray(UINT16), ".png", gray_rgb(scaled_16_bit(UINT16))),
    "I;16B": (Image.fromarray(UINT16.astype(">u2")), ".tif", gray_rgb(scaled_16_bit(UINT16))),
    "I (16-bit data)": (Image.fromarray(UINT16.astype(np.int32)), ".tif", gray_rgb(scaled_16_bit(UINT16))),
    "F": (Image.fromarray(FLOATS), ".tif", gray_rgb(np.round(FLOATS.astype(np.float64) * 255).astype(np.uint8))),
}


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the grayscale Pillow documents for ``convert('L')``, in float."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("case", list(CASES))
def test_every_pillow_mode_decodes_to_the_pixels_it_means(tmp_path, case):
    image, suffix, expected_rgb = CASES[case]
    path = tmp_path / f"picture{suffix}"
    image.save(path, **({"transparency": 0} if case == "P with transparency" else {}))
    with Image.open(path) as stored:
        assert stored.mode == image.mode, "the file keeps the mode under test"
    rgb = transforms.decode_image(str(path), 3)
    assert rgb.dtype == np.uint8 and rgb.shape == expected_rgb.shape
    # YCbCr -> RGB is Pillow's integer approximation of the JPEG matrix: within one level.
    np.testing.assert_allclose(rgb, expected_rgb, atol=1 if case == "YCbCr" else 0, rtol=0)
    gray = transforms.decode_image(str(path), 1)
    assert gray.dtype == np.uint8 and gray.shape == (*expected_rgb.shape[:2], 1)
    np.testing.assert_allclose(gray[..., 0], luma(expected_rgb), atol=1, rtol=0)


def test_sixteen_and_thirty_two_bit_images_use_the_full_8_bit_range_without_wrapping(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 4).round().astype(np.uint16).reshape(4, 64)
    for mode, array, suffix in (("I;16", ramp, ".png"), ("I", ramp.astype(np.int32), ".tif")):
        path = tmp_path / f"ramp_{len(mode)}{suffix}"
        Image.fromarray(array).save(path)
        pixels = transforms.decode_image(str(path), 1)[..., 0].astype(int)
        assert pixels.min() == 0 and pixels.max() == 255, mode
        assert (np.diff(pixels, axis=1) >= 0).all(), f"{mode}: a brighter sample never decodes darker (no wrap)"


@pytest.mark.parametrize(
    "values, problem",
    [
        (np.array([[0, 70000]], np.int32), r"values in \[0, 70000\], outside the 16-bit range"),
        (np.array([[-5, 100]], np.int32), r"values in \[-5, 100\]"),
        (np.array([[0.0, 1.5]], np.float32), r"float \('F'\) image with values in \[0, 1.5\]"),
        (np.array([[-0.25, 0.5]], np.float32), r"values in \[-0.25, 0.5\]"),
        (np.array([[np.nan, 0.5]], np.float32), r"NaN/inf"),
    ],
    ids=["int32_above_16_bits", "int32_negative", "float_above_1", "float_negative", "float_nan"],
)
def test_32_bit_and_float_images_outside_their_range_are_refused_naming_the_file(tmp_path, values, problem):
    path = tmp_path / "out_of_range.tif"
    Image.fromarray(values).save(path)
    for channels in (1, 3):
        with pytest.raises(transforms.CorruptImageError, match=problem) as error:
            transforms.decode_image(str(path), channels)
        assert str(path) in str(error.value)


def test_image_folders_read_tiff_and_the_other_formats_torchvision_reads(tmp_path):
    folder = tmp_path / "train" / "scans"
    folder.mkdir(parents=True)
    Image.fromarray(FLOATS).save(folder / "a_float.tif")
    Image.fromarray(UINT16).save(folder / "b_16bit.tiff")
    Image.fromarray(RGB).save(folder / "c.bmp")
    Image.fromarray(RGB).save(folder / "d.webp", lossless=True)
    source = sources.ImageFolderSource(tmp_path / "train")
    assert len(source) == 4
    decoded = [transforms.decode_image(source[i]["image"], 3) for i in range(len(source))]
    np.testing.assert_array_equal(decoded[1], gray_rgb(scaled_16_bit(UINT16)))
    np.testing.assert_array_equal(decoded[3], RGB)
