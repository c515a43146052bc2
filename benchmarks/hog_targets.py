"""LocalMIM's HOG targets on the device or on the host: XLA's counts against the train step, and host time.

    python benchmarks/hog_targets.py

At ViT-B/16's input (224x224 RGB, cells of 4 / 8 / 16 / 32 pixels, 9 bins):

- on the device: the compiled ``targets.hog.multiscale_hog`` of a batch (FLOPs
  and bytes accessed per image, ``cost_analysis()``; temporary memory of the
  batch, ``memory_analysis()``), beside the LocalMIM train step's FLOPs per
  image and temporary memory (``tools.cost.measure``), and what HOG adds to
  the step: the same step with constant targets in place of HOG;
- on the host: the same function's wall time per image on one CPU thread
  (XLA CPU, a lower bound for a numpy worker), and the bytes per image a host
  route would send (float32 targets) against the uint8 image.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax.targets import hog

CELLS = (4, 8, 16, 32)
IMAGE = (224, 224, 3)


def device_counts(batch: int) -> dict:
    images = jax.ShapeDtypeStruct((batch, *IMAGE), jnp.float32)
    compiled = jax.jit(lambda x: hog.multiscale_hog(x, CELLS)).lower(images).compile()
    cost = compiled.cost_analysis()
    return {
        "hog_flops": cost["flops"] / batch,
        "hog_bytes_accessed": cost["bytes accessed"] / batch,
        "hog_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }


def step_counts(batch: int) -> dict:
    """The LocalMIM ViT-B/16 train step's FLOPs per image and temporary bytes, with HOG and with constant targets."""
    from prmim_jax.tools import cost

    method = cost.build_method("localmim", cost.model_config("localmim", "B/16"), dict(reconstruction="full"))
    with_hog = cost.measure(method, batch)
    shapes = jax.eval_shape(method.hog_targets, jax.ShapeDtypeStruct((batch, *IMAGE), jnp.float32))
    # Constant targets that still read the images, so that nothing else of the step changes.
    method.hog_targets = lambda images: tuple(jnp.zeros(s.shape) + images.mean() for s in shapes)
    without = cost.measure(method, batch)
    return {
        "step_flops": with_hog["step_flops"],
        "step_temp_bytes": with_hog["temp_bytes"],
        "step_temp_bytes_constant_targets": without["temp_bytes"],
    }


def host_seconds_per_image(repeats: int = 5) -> float:
    images = np.random.default_rng(0).normal(size=(1, *IMAGE)).astype(np.float32)
    run = jax.jit(lambda x: hog.multiscale_hog(x, CELLS))
    jax.block_until_ready(run(images))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(images))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    row = device_counts(args.batch) | step_counts(args.batch)
    row["host_seconds_per_image"] = host_seconds_per_image()
    features = sum(27 * (224 // cell) ** 2 for cell in CELLS)
    row["target_bytes_per_image"], row["image_bytes"] = 4 * features, int(np.prod(IMAGE))
    row["load_average"] = os.getloadavg()[0]
    print(json.dumps(row, indent=1))
    print(
        f"HOG on device: {row['hog_flops'] / 1e6:.1f} MFLOPs/image = "
        f"{row['hog_flops'] / row['step_flops']:.2e} of the train step's {row['step_flops'] / 1e9:.1f} GFLOPs; "
        f"temp {row['hog_temp_bytes'] / 2**20:.0f} MiB alone for {args.batch} images; the step's "
        f"{row['step_temp_bytes'] / 2**20:.0f} MiB, "
        f"{row['step_temp_bytes_constant_targets'] / 2**20:.0f} MiB with constant targets; "
        f"host: {1e3 * row['host_seconds_per_image']:.1f} ms/image on one thread, "
        f"{row['target_bytes_per_image'] / row['image_bytes']:.1f}x the uint8 image's bytes"
    )


if __name__ == "__main__":
    main()
