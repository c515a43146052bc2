"""Reconstruction pictures across checkpoints (the paper's Fig. 7).

    python -m prmim_jax.tools.pictures --workdirs workdirs/mae,workdirs/prmim --out fig7.png

Rows: the original images, the visible tokens, then for each workdir (its
latest checkpoint, built from the ``config.json`` the run saved) its
reconstruction and its token map (``pictures.token_map``: decoded tokens
green, thrown ones orange), each labelled on the left with the workdir's name. Every run sees the same images and the same
visible tokens; each method's own sampler chooses which masked tokens it
decodes and throws.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from prmim_jax import pictures, runs
from prmim_jax.data import pipeline


def picture(workdirs, num_images: int = 8, seed: int = 0) -> np.ndarray:
    """The ``uint8`` grid for ``workdirs`` (see the module docstring)."""
    loaded = [runs.load(w) for w in workdirs]
    first = loaded[0].config
    for workdir, run in zip(workdirs, loaded, strict=True):
        config = run.config
        if (config.data.source, config.model.image_size, config.model.channels) != (
            first.data.source,
            first.model.image_size,
            first.model.channels,
        ):
            raise ValueError(f"{workdir} was trained on other images than {workdirs[0]}; compare runs on one dataset.")
    images = next(iter(pipeline.eval_dataset(pipeline.in_process(first.data), batch_size=num_images)))["images"]
    rows, labels = [], list(pictures.ROW_LABELS[:2])
    for workdir, run in zip(workdirs, loaded, strict=True):
        draw = run.method.predict_fns().get("picture")
        if draw is None:
            raise ValueError(f"{workdir} is a {run.method.name!r} run, which draws no reconstructions.")
        drawn = draw(run.variables, np.asarray(images), seed).with_token_map()
        rows = rows or list(drawn[:2])
        rows += [drawn[2], drawn[3]]
        name = os.path.basename(os.path.normpath(workdir))
        labels += [(*label[:1], name, *label[1:]) for label in pictures.ROW_LABELS[2:]]  # the run under the row's name
    return pictures.tile(np.stack(rows), scale=pictures.picture_scale(first.model.image_size), labels=labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdirs", required=True, help="comma-separated pretraining workdirs, one row each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the token noise (same visible tokens for all)")
    args = parser.parse_args(argv)
    image = picture(args.workdirs.split(","), args.num_images, args.seed)
    pictures.save_png(image, args.out)
    print(f"wrote {args.out}: {image.shape[1]}x{image.shape[0]}")


if __name__ == "__main__":
    main()
