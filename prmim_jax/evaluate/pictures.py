"""Reconstruction pictures across checkpoints (the paper's Fig. 7).

    python -m prmim_jax.evaluate.pictures --workdirs workdirs/mae,workdirs/prmim --out fig7.png

Rows: the original images, the visible tokens, then for each workdir (its
latest checkpoint, built from the ``config.json`` the run saved) its
reconstruction and its token map (``reconstruction.token_map``: decoded tokens
green, thrown ones orange). Every run sees the same images and the same
visible tokens; each method's own sampler chooses which masked tokens it
decodes and throws.
"""

from __future__ import annotations

import argparse

import numpy as np

from prmim_jax import train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import in_process, reconstruction


def picture(workdirs, num_images: int = 8, seed: int = 0) -> np.ndarray:
    """The ``uint8`` grid for ``workdirs`` (see the module docstring)."""
    runs = [train.load_run(w) for w in workdirs]
    first = runs[0][0]
    for workdir, (config, *_) in zip(workdirs, runs, strict=True):
        if (config.data.source, config.model.image_size, config.model.channels) != (
            first.data.source,
            first.model.image_size,
            first.model.channels,
        ):
            raise ValueError(f"{workdir} was trained on other images than {workdirs[0]}; compare runs on one dataset.")
    eval_data = in_process(first.data)
    images = next(iter(pipeline.eval_dataset(eval_data, batch_size=num_images)))["images"]
    rows = []
    for workdir, (_, method, params, _) in zip(workdirs, runs, strict=True):
        if method.picture is None:
            raise ValueError(f"{workdir} is a {method.name!r} run, which draws no reconstructions.")
        run_rows, run_marks, patch_size = method.picture(params, np.asarray(method.normalize(images)), seed)
        grid = (run_rows.shape[2] // patch_size, run_rows.shape[3] // patch_size)
        rows = rows or list(run_rows[:2])
        rows += [run_rows[2], reconstruction.token_map(run_marks, grid, patch_size)]
    return reconstruction.tile(np.stack(rows), scale=reconstruction.picture_scale(first.model.image_size))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdirs", required=True, help="comma-separated pretraining workdirs, one row each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the token noise (same visible tokens for all)")
    args = parser.parse_args(argv)
    image = picture(args.workdirs.split(","), args.num_images, args.seed)
    reconstruction.save_png(image, args.out)
    print(f"wrote {args.out}: {image.shape[1]}x{image.shape[0]}")


if __name__ == "__main__":
    main()
