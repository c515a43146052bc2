"""Pretraining input pipeline throughput on one CPU core: images/s through the whole chain.

    taskset -c 0 python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline_cpu

Run it under ``taskset -c 0``: the pipeline runs in-process (``num_workers=0``,
``num_threads=0``), so images/s on one pinned core is the per-core rate; a host
with W worker processes (``data.num_workers``) scales it by about W.

Two cases, each ``pretrain_dataset`` end to end (shuffle, decode, MAE's random
resized crop + flip, normalisation, per-image token noise, batching and the
``furthest`` sampler at mask 0.75, throw 0.5 on a 14x14 token grid):

- ``jpeg_224``: an image folder of ``--jpegs`` synthetic 500x375 JPEGs
  (ImageNet's typical size; smooth random fields plus noise, quality 90, so the
  files are about the size of natural photos, not of white noise), cropped to
  224 (ViT-B/16's grid).
- ``fashion_mnist_28``: Debian's Fashion-MNIST IDX files at 28 (patch 2).

The rate per core is images per CPU second of the process (``time.process_time``,
all its threads), which a busy neighbour on a shared machine barely changes; the
wall-clock rate is reported beside it. Also reported, per image: the CPU time
of each stage alone (decode, crop + flip, normalise, noise, sampler), to show
where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import PIL
import PIL.features
from PIL import Image

from prmim_jax import masking
from prmim_jax.data import data_config, pretrain_dataset, sources, transforms

SAMPLER = "furthest"
LAYOUT = masking.TokenLayout((14, 14), 0.75, 0.5)


def write_jpegs(directory: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
    """``count`` 500x375 RGB JPEGs under ``directory/train/<class>/``; two classes."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, np.float32) + rng.normal(0.0, 8.0, (375, 500, 3))
        path = directory / "train" / f"class_{index % 2}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pipeline_rate(config, batch: int, batches: int, warmup: int = 2) -> dict[str, float]:
    """Images per CPU second and per wall second of ``pretrain_dataset``, best of 3 runs of ``batches`` batches."""
    best_cpu = best_wall = float("inf")
    for _ in range(3):
        iterator = iter(pretrain_dataset(config, LAYOUT, SAMPLER, global_batch=batch))
        for _ in range(warmup):
            next(iterator)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
        iterator.close()
    return {"images_per_cpu_s": batch * batches / best_cpu, "images_per_wall_s": batch * batches / best_wall}


def stage_times(config, items: list[dict], batch: int) -> dict[str, float]:
    """Microseconds per image of each stage alone, over ``items`` (source items)."""
    decode = transforms.DecodeImage(config.channels)
    crop = transforms.RandomResizedCropFlip(config.image_size, tuple(config.crop_scale), tuple(config.crop_ratio))
    normalize = transforms.Normalize(tuple(config.mean), tuple(config.std))
    noise = transforms.DrawTokenNoise(LAYOUT)
    rng = np.random.default_rng(0)
    times = {}

    def timed(name, function, inputs):
        start = time.process_time()
        outputs = [function(x) for x in inputs]
        times[name] = (time.process_time() - start) / len(inputs) * 1e6
        return outputs

    decoded = timed("decode", decode.map, items)
    cropped = timed("crop_flip", lambda x: crop.random_map(x, rng), decoded)
    normalized = timed("normalize", normalize.map, cropped)
    with_noise = timed("token_noise", lambda x: noise.random_map(x, rng), normalized)
    noise_batch = np.stack([x["token_noise"] for x in with_noise[:batch]])
    start = time.process_time()
    masking.sample(SAMPLER, noise_batch, LAYOUT)
    times["sampler"] = (time.process_time() - start) / len(noise_batch) * 1e6
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpegs", type=int, default=256)
    parser.add_argument("--jpeg_batch", type=int, default=64)
    parser.add_argument("--jpeg_batches", type=int, default=8)
    parser.add_argument("--mnist_batch", type=int, default=256)
    parser.add_argument("--mnist_batches", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if cores is not None and len(cores) > 1:
        print(f"warning: {len(cores)} cores allowed; run under `taskset -c 0` for a per-core rate.")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(pathlib.Path(tmp), args.jpegs)
        mean_kib = np.mean([p.stat().st_size for p in paths]) / 1024
        config = data_config(source="image_folder", path=tmp, image_size=224)
        results["jpeg_224"] = {
            **pipeline_rate(config, args.jpeg_batch, args.jpeg_batches),
            "batch": args.jpeg_batch,
            "input": f"{args.jpegs} JPEGs 500x375, mean {mean_kib:.0f} KiB",
            "stage_us_per_image": stage_times(
                config, [{"image": str(p), "label": 0} for p in paths[:128]], args.jpeg_batch
            ),
        }
    config = data_config()
    source = sources.FashionMnistSource(config.path, "train")
    results["fashion_mnist_28"] = {
        **pipeline_rate(config, args.mnist_batch, args.mnist_batches),
        "batch": args.mnist_batch,
        "input": f"Fashion-MNIST IDX ({config.path})",
        "stage_us_per_image": stage_times(config, [source[i] for i in range(1024)], args.mnist_batch),
    }

    meta = {
        "sampler": SAMPLER,
        "grid": LAYOUT.grid,
        "mask_ratio": LAYOUT.mask_ratio,
        "throw_ratio": LAYOUT.throw_ratio,
        "cpu": platform.processor() or platform.machine(),
        "cores_allowed": cores,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": PIL.features.check("libjpeg_turbo"),
    }
    stages = ("decode", "crop_flip", "normalize", "token_noise", "sampler")
    lines = [
        f"Pretraining pipeline, in-process, cores {cores}; sampler {SAMPLER}, 14x14 grid, mask 0.75, throw 0.5:",
        "",
        "| case | input | batch | images/s per core | images/s wall | "
        + " | ".join(f"{s} us/img" for s in stages)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(stages),
        *[
            f"| {name} | {r['input']} | {r['batch']} | {r['images_per_cpu_s']:,.0f} | {r['images_per_wall_s']:,.0f} | "
            + " | ".join(f"{r['stage_us_per_image'][s]:.1f}" for s in stages)
            + " |"
            for name, r in results.items()
        ],
    ]
    print("\n".join(lines))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
