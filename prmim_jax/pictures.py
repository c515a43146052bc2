"""Reconstruction pictures: original / visible tokens / reconstruction / token map, drawn with numpy.

Rows of a picture, one column per image, upscaled to at least 112 pixels, each row named in a
label column on the left (``ROW_LABELS``, with the token map's colour key):
1. the original image;
2. what the encoder sees: visible patches, masked patches grey;
3. the reconstruction, unmarked: visible patches as given (also where VideoMAE
   V2's running-cell decoder predicts them), masked patches from the model's
   predictions (norm-pix predictions are mapped back with each original patch's
   mean and variance, as MAE's visualisation does); a masked patch nothing
   predicts (thrown under partial reconstruction) stays black;
4. the token map (``token_map`` of ``token_marks``): each token's cell light grey
   (visible), green (decoded by the decoder) or orange (thrown: reconstructed
   by the aggregation under PR-MIM, by nothing under partial reconstruction).

A method that reconstructs pixels gives ``Picture``s (its ``picture`` predict function); the evaluator
``prmim_jax.evaluate.reconstruction`` and the tool ``prmim_jax.tools.pictures`` lay them out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from prmim_jax import masking
from prmim_jax.models import mae as mae_lib
from prmim_jax.models import vit

VISIBLE_CELL = (0.82, 0.82, 0.82)  # light grey: the white gaps still part the images


DECODED_CELL = (0.1, 0.7, 0.2)


THROWN_CELL = (1.0, 0.55, 0.0)


MASKED_GREY = 0.5


# A row's label: its lines, each a string or ``(colour, text)``: a swatch of that colour, then the text.
ROW_LABELS = (
    ("original",),
    ("visible tokens", ((MASKED_GREY,) * 3, "masked")),
    ("reconstruction",),
    ("token map", (VISIBLE_CELL, "visible"), (DECODED_CELL, "decoded"), (THROWN_CELL, "thrown")),
)
LABEL_INK = (0.15, 0.15, 0.15)


def picture_rows(
    images: np.ndarray,
    ids: masking.TokenIds,
    output: mae_lib.MAEOutput,
    patch_size: int,
    mean,
    std,
    norm_pix: bool = True,
) -> np.ndarray:
    """``images [B, H, W, C]`` (normalised) and the model's output -> ``[3, B, H, W, 3]`` float in [0, 1]."""
    images = np.asarray(images, np.float32)
    batch, height, width, channels = images.shape
    grid = (height // patch_size, width // patch_size)
    raw = np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    patches = np.asarray(vit.patchify(raw, patch_size))  # [B, N, p*p*C] in [0, 1]

    def denormalise(pred, token_ids):
        pred = np.asarray(pred, np.float32)
        if not norm_pix:
            return np.clip(pred * np.asarray(std).mean() + np.asarray(mean).mean(), 0, 1)
        target = np.take_along_axis(np.asarray(vit.patchify(images, patch_size)), token_ids[..., None], axis=1)
        mu, var = target.mean(-1, keepdims=True), target.var(-1, ddof=1, keepdims=True)
        pixels = pred * np.sqrt(var + mae_lib.NORM_PIX_EPS) + mu
        pixels = pixels.reshape(*pixels.shape[:2], -1, channels) * np.asarray(std) + np.asarray(mean)
        return np.clip(pixels.reshape(*pred.shape), 0, 1)

    rows = np.arange(batch)[:, None]
    visible_only = np.full_like(patches, MASKED_GREY)
    visible_only[rows, ids.visible] = patches[rows, ids.visible]
    reconstruction = np.zeros_like(patches)
    reconstruction[rows, ids.decoded] = denormalise(output.pred_decoded, ids.decoded)
    if output.pred_thrown is not None and ids.thrown.shape[1]:
        reconstruction[rows, ids.thrown] = denormalise(output.pred_thrown, ids.thrown)
    reconstruction[rows, ids.visible] = patches[rows, ids.visible]  # last: decoded ids may hold visible ones

    def to_rgb(flat):
        tiles = flat.reshape(batch, -1, patch_size, patch_size, channels)
        return np.repeat(tiles, 3, axis=-1) if channels == 1 else tiles

    def to_images(tiles):
        return np.asarray(vit.unpatchify(tiles.reshape(batch, tiles.shape[1], -1), patch_size, grid))

    return np.stack([to_images(to_rgb(patches)), to_images(to_rgb(visible_only)), to_images(to_rgb(reconstruction))])


def token_marks(ids: masking.TokenIds, num_tokens: int) -> np.ndarray:
    """``[B, N] int8``: 0 visible, 1 decoded (masked), 2 thrown (masked)."""
    marks = np.zeros((ids.visible.shape[0], num_tokens), np.int8)
    rows = np.arange(len(marks))[:, None]
    marks[rows, ids.decoded] = 1
    marks[rows, ids.thrown] = 2
    marks[rows, ids.visible] = 0  # VideoMAE V2's running-cell decoder decodes and throws visible ones too
    return marks


def token_map(marks: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """``marks [B, N]`` (``token_marks``) -> ``[B, H, W, 3]`` in [0, 1]: each token's ``patch_size`` cell light grey
    (visible), green (decoded) or orange (thrown), with a grey line between cells of 3 pixels or more."""
    colours = np.asarray([VISIBLE_CELL, DECODED_CELL, THROWN_CELL], np.float32)
    cells = colours[np.asarray(marks)].reshape(len(marks), *grid, 1, 1, 3)
    cells = np.broadcast_to(cells, (len(marks), *grid, patch_size, patch_size, 3)).copy()
    if patch_size >= 3:
        cells[..., -1, :, :] = cells[..., :, -1, :] = MASKED_GREY
    return cells.transpose(0, 1, 3, 2, 4, 5).reshape(len(marks), grid[0] * patch_size, grid[1] * patch_size, 3)


def tile(rows: np.ndarray, scale: int = 1, gap: int = 2, labels=None) -> np.ndarray:
    """``[R, B, H, W, 3]`` in [0, 1] -> one ``uint8`` image, R rows by B columns, each image upscaled ``scale``
    times (nearest neighbour), white gaps; with ``labels`` (one per row, as ``ROW_LABELS``) a label column on
    the left (``label_column``)."""
    num_rows, batch, height, width, _ = rows.shape
    height, width = height * scale, width * scale
    canvas = np.ones((num_rows * (height + gap) - gap, batch * (width + gap) - gap, 3), np.float32)
    for r in range(num_rows):
        for b in range(batch):
            image = rows[r, b].repeat(scale, 0).repeat(scale, 1)
            canvas[r * (height + gap) : r * (height + gap) + height, b * (width + gap) : b * (width + gap) + width] = (
                image
            )
    if labels is not None:
        canvas = np.concatenate([label_column(labels, height, gap), canvas], axis=1)
    return (canvas * 255).round().astype(np.uint8)


def label_column(labels, row_height: int, gap: int) -> np.ndarray:
    """``[R * (row_height + gap) - gap, width, 3]`` float in [0, 1]: each row's label lines (``ROW_LABELS``'
    form) in Pillow's default font from the top of its row, white ground, as wide as the widest line."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Tg", font=font)[3] + 3
    swatch = line_height - 4

    def parts(line):
        return (None, line) if isinstance(line, str) else line

    def line_width(line):
        colour, text = parts(line)
        return measure.textlength(text, font=font) + (swatch + 4 if colour else 0)

    width = int(max(line_width(line) for label in labels for line in label)) + 12
    column = Image.new("RGB", (width, len(labels) * (row_height + gap) - gap), "white")
    draw = ImageDraw.Draw(column)

    def rgb(colour):
        return tuple(round(255 * c) for c in colour)

    for r, label in enumerate(labels):
        for i, line in enumerate(label):
            colour, text = parts(line)
            x, y = 4, r * (row_height + gap) + 4 + i * line_height
            if colour:
                draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=rgb(colour), outline=rgb(LABEL_INK))
                x += swatch + 4
            draw.text((x, y), text, fill=rgb(LABEL_INK), font=font)
    return np.asarray(column, np.float32) / 255


def picture_scale(image_size) -> int:
    """How many times a picture upscales images of ``image_size`` (an int or ``(h, w)``): to at least 112 pixels."""
    side = image_size if isinstance(image_size, int) else min(image_size)
    return max(1, -(-112 // side))


def save_png(image: np.ndarray, path) -> None:
    Image.fromarray(image).save(path)


class Picture(NamedTuple):
    """One method's drawing of ``b`` images: ``rows [3, b, H, W, 3]`` in [0, 1] (original, visible tokens,
    reconstruction: ``picture_rows``), ``marks [b, N] int8`` (``token_marks``) and the token ``patch_size``
    in pixels."""

    rows: np.ndarray
    marks: np.ndarray
    patch_size: int

    def with_token_map(self) -> np.ndarray:
        """``[4, b, H, W, 3]``: the rows and, under them, the token map."""
        grid = (self.rows.shape[2] // self.patch_size, self.rows.shape[3] // self.patch_size)
        return np.concatenate([self.rows, token_map(self.marks, grid, self.patch_size)[None]])
