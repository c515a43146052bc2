"""Pretraining input pipeline throughput: images/s per core, the candidates behind the JPEG path, worker scaling.

    python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline_cpu

Needs scikit-image (``requirements-test.txt``) for its sample photographs. No ``taskset`` needed: the
single-process parts pin this process to its first allowed core themselves, and the worker part then
widens the affinity again to every allowed core.

The data: ``--jpegs`` ImageNet-like JPEGs made from scikit-image's sample photographs (astronaut,
coffee, chelsea, rocket, motorcycle, ...): for each, a random region of a photograph with a 4:3 or
3:4 aspect, resized to 500x375 or 375x500 (ImageNet's typical size), randomly mirrored, saved at
quality 90. Natural content matters: noise decodes and resamples unlike photographs. The image
folder that the pipelines read holds ``--folder_size`` entries, hard links to those files in turn:
grain's shuffle has a per-epoch cost that a folder of a few hundred images would charge to every
image (0.1-0.5 ms here), and ImageNet's 1.28M images never pay.

Parts, all at 224 with MAE's pretraining crops (scale 0.2..1) unless said:

1. ``candidates``: per-image CPU time, one core, of each decoder (Pillow, simplejpeg, simplejpeg with
   its fast-but-inexact options, simplejpeg at 1/2 scale, OpenCV's imdecode) and of each crop
   resampler (Pillow's antialiased bicubic, the reference; ours, OpenCV with Pillow's kernel as a
   low-pass; plain OpenCV area / linear / cubic), each resampler with its PSNR to Pillow's crop of
   the same box. Rounds interleave the candidates; the median round is reported.
2. ``dct_scaling``: reduced-size (DCT) decoding, on large photographs (>= 1000 px) where a crop
   still has >= 224 pixels per side at 1/2 scale: its decode time relative to a full decode, and the
   PSNR of its crop (Pillow, exact fractional box) to the full-resolution crop.
3. ``per_core``: ``pretrain_dataset`` end to end in this process (shuffle, decode, random resized
   crop + flip, [normalise], per-image token noise, batching, the ``furthest`` sampler at mask 0.75,
   throw 0.5 on 14x14 tokens), images per CPU second on one core, for the previous host path
   (Pillow decode and crop, float32 normalised on the host) and the current default (simplejpeg,
   OpenCV crops, uint8 batches), in interleaved rounds; and each transform's time per image.
   Also Fashion-MNIST at 28 (patch 2), the default config.
4. ``workers``: the current default with ``data.num_workers`` 1 and 2 (grain worker processes), wall
   clock images/s with every allowed core available.

Rates per core are images per CPU second of the process (``time.process_time``), which a busy
neighbour on a shared machine changes much less than wall-clock rates (both are reported). Worker
rates can only be wall clock, so they show the machine's load: the load average is recorded.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import pathlib
import platform
import tempfile
import time

import cv2
import numpy as np
import PIL
import PIL.features
import simplejpeg
from PIL import Image

from prmim_jax import masking, masking_transforms
from prmim_jax.data import data_config, pretrain_dataset, sources, transforms

SAMPLER = "furthest"
LAYOUT = masking.TokenLayout((14, 14), 0.75, 0.5)
SIZE = 224
RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
PREVIOUS = dict(jpeg_decoder="pillow", crop_resampler="pillow", device_normalize=False)  # before the fast path


def photographs() -> list[np.ndarray]:
    """scikit-image's RGB sample photographs, ``[H, W, 3] uint8`` each (the stereo motorcycle pair counted twice)."""
    import skimage.data

    pictures = [getattr(skimage.data, name)() for name in RGB_PHOTOS]
    left, right, _ = skimage.data.stereo_motorcycle()
    return [*pictures, left, right]


def write_jpegs(directory: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
    """``count`` ImageNet-like JPEGs (see the module docstring) under ``directory/train/<class>/``; two classes."""
    rng = np.random.default_rng(seed)
    pictures = photographs()
    paths = []
    for index in range(count):
        picture = pictures[index % len(pictures)]
        full_h, full_w = picture.shape[:2]
        width, height = (375, 500) if rng.random() < 0.25 else (500, 375)
        fit = min(full_w / width, full_h / height) * rng.uniform(0.6, 1.0)
        crop_w, crop_h = int(width * fit), int(height * fit)
        left, top = int(rng.integers(0, full_w - crop_w + 1)), int(rng.integers(0, full_h - crop_h + 1))
        image = Image.fromarray(picture).crop((left, top, left + crop_w, top + crop_h))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = directory / "train" / f"class_{index % 2}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def link_copies(paths: list[pathlib.Path], directory: pathlib.Path, count: int) -> None:
    """``count`` image-folder entries under ``directory/train/<class>/``: hard links to ``paths`` in turn."""
    for index in range(count):
        link = directory / "train" / f"class_{index % 2}" / f"{index:06d}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(paths[index % len(paths)], link)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def interleaved_us(functions: dict, calls: list[tuple], rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of each function's CPU microseconds per call (``calls``: argument tuples).

    The functions alternate within a round, so a change of load on a shared machine affects them alike.
    """
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.process_time()
            for arguments in calls:
                function(*arguments)
            times[name].append((time.process_time() - start) / len(calls) * 1e6)
    return {name: float(np.median(values)) for name, values in times.items()}


def decoder_candidates(blobs: list[bytes]) -> dict[str, dict]:
    """Each decoder's time per image and whether it gives Pillow's pixels."""
    candidates = {
        "pillow": lambda b: transforms.decode_image(b, 3, jpeg_decoder="pillow"),
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b),
        "simplejpeg_fastdct_fastupsample": lambda b: simplejpeg.decode_jpeg(b, fastdct=True, fastupsample=True),
        # 1/8 scale: little IDCT and colour work left, so about the cost of entropy decoding alone.
        "simplejpeg_eighth_scale": lambda b: simplejpeg.decode_jpeg(b, min_factor=8, min_height=1, min_width=1),
        "opencv_imdecode": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB),
        "pipeline_decode_image": lambda b: transforms.decode_image(b, 3),
    }
    times = interleaved_us(candidates, [(b,) for b in blobs])
    results = {}
    for name, function in candidates.items():
        same = all(
            np.array_equal(function(b), transforms.decode_image(b, 3, jpeg_decoder="pillow")) for b in blobs[:16]
        )
        results[name] = {"us_per_image": times[name], "images_per_s": 1e6 / times[name], "pillow_pixels": same}
    return results


def opencv_plain(interpolation):
    def resize(image, box):
        top, left, height, width = box
        return cv2.resize(image[top : top + height, left : left + width], (SIZE, SIZE), interpolation=interpolation)

    return resize


def resampler_candidates(images: list[np.ndarray], seed: int = 0) -> dict[str, dict]:
    """Each crop resampler's time per image and PSNR to Pillow's crop of the same box."""
    rng = np.random.default_rng(seed)
    boxes = [transforms.random_resized_crop_box(rng, *image.shape[:2]) for image in images]
    candidates = {
        "pillow": lambda image, box: transforms.resized_crop(image, box, SIZE, "pillow"),
        "opencv_antialiased (ours)": lambda image, box: transforms.resized_crop(image, box, SIZE, "opencv"),
        "opencv_area": opencv_plain(cv2.INTER_AREA),
        "opencv_linear": opencv_plain(cv2.INTER_LINEAR),
        "opencv_cubic": opencv_plain(cv2.INTER_CUBIC),
    }
    pairs = list(zip(images, boxes, strict=True))
    times = interleaved_us(candidates, pairs)
    references = [candidates["pillow"](image, box) for image, box in pairs]
    results = {}
    for name, function in candidates.items():
        values = [psnr(function(image, box), ref) for (image, box), ref in zip(pairs, references, strict=True)]
        results[name] = {
            "us_per_image": times[name],
            "psnr_db_min": min(values),
            "psnr_db_median": float(np.median(values)),
        }
    return results


def dct_scaling(count: int = 60, seed: int = 0) -> dict:
    """Decoding at 1/2 scale where the crop allows it, on large photographs: decode-time ratio and crop PSNR."""
    rng = np.random.default_rng(seed)
    blobs = []
    for picture in photographs():
        image = Image.fromarray(picture)
        while max(image.size) < 1000:  # at least 1000 px, ImageNet's larger originals
            image = image.resize((image.width * 2, image.height * 2), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    values, full_s, half_s, used = [], 0.0, 0.0, 0
    for index in range(count):
        blob = blobs[index % len(blobs)]
        full = simplejpeg.decode_jpeg(blob)
        height, width = full.shape[:2]
        top, left, crop_h, crop_w = transforms.random_resized_crop_box(rng, height, width)
        if min(crop_h, crop_w) < 2 * SIZE:
            continue
        used += 1
        start = time.process_time()
        half = simplejpeg.decode_jpeg(blob, min_height=math.ceil(height / 2), min_width=math.ceil(width / 2))
        middle = time.process_time()
        simplejpeg.decode_jpeg(blob)
        full_s, half_s = full_s + time.process_time() - middle, half_s + middle - start
        reference = transforms.resized_crop(full, (top, left, crop_h, crop_w), SIZE, "pillow")
        box = (left / 2, top / 2, (left + crop_w) / 2, (top + crop_h) / 2)
        scaled = np.asarray(Image.fromarray(half).resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box))
        values.append(psnr(scaled, reference))
    return {
        "crops": used,
        "decode_time_half_over_full": half_s / full_s,
        "psnr_db_min": min(values),
        "psnr_db_median": float(np.median(values)),
    }


def stage_times(config, items: list[dict], batch: int) -> dict[str, float]:
    """CPU microseconds per image of each pipeline stage alone, over ``items`` (source items)."""
    decode = transforms.DecodeImage(config.channels, config.jpeg_decoder)
    crop = transforms.RandomResizedCropFlip(
        config.image_size, tuple(config.crop_scale), tuple(config.crop_ratio), config.flip, config.crop_resampler
    )
    noise = masking_transforms.DrawTokenNoise(LAYOUT)
    rng = np.random.default_rng(0)
    times = {}

    def timed(name, function, inputs):
        start = time.process_time()
        outputs = [function(x) for x in inputs]
        times[name] = (time.process_time() - start) / len(inputs) * 1e6
        return outputs

    decoded = timed("decode", decode.map, items)
    cropped = timed("crop_flip", lambda x: crop.random_map(x, rng), decoded)
    if not config.device_normalize:
        cropped = timed("normalize", transforms.Normalize(tuple(config.mean), tuple(config.std)).map, cropped)
    else:
        times["normalize"] = 0.0  # on the device
    with_noise = timed("token_noise", lambda x: noise.random_map(x, rng), cropped)
    noise_batch = np.stack([x["token_noise"] for x in with_noise[:batch]])
    start = time.process_time()
    masking.sample(SAMPLER, noise_batch, LAYOUT)
    times["sampler"] = (time.process_time() - start) / len(noise_batch) * 1e6
    return times


def pipeline_rates(configs: dict, batch: int, batches: int, rounds: int = 3, warmup: int = 2) -> dict[str, dict]:
    """Images per CPU second and per wall second of ``pretrain_dataset`` for each config; rounds interleave them."""
    cpu = {name: [] for name in configs}
    wall = {name: [] for name in configs}
    for _ in range(rounds):
        for name, config in configs.items():
            iterator = iter(pretrain_dataset(config, LAYOUT, SAMPLER, global_batch=batch))
            for _ in range(warmup):
                next(iterator)
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for _ in range(batches):
                next(iterator)
            cpu[name].append(batch * batches / (time.process_time() - cpu_start))
            wall[name].append(batch * batches / (time.perf_counter() - wall_start))
            iterator.close()
    return {
        name: {
            "images_per_cpu_s": float(np.median(cpu[name])),
            "images_per_wall_s": float(np.median(wall[name])),
            "rounds_images_per_cpu_s": [round(v, 1) for v in cpu[name]],
        }
        for name in configs
    }


def process_tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (grain's workers); Linux."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid()] + [child.pid for child in multiprocessing.active_children()]:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of stat
    return total


def worker_rates(config, workers: tuple[int, ...], batch: int, batches: int, repeats: int = 3) -> dict[str, dict]:
    """``pretrain_dataset`` with ``num_workers`` grain worker processes: images/s, median of ``repeats``.

    ``images_per_wall_s`` depends on how many cores are free; ``images_per_cpu_s`` counts the CPU
    seconds of this process and its workers together, so it stays at the per-core rate while the
    workers scale linearly (no cost added by the extra processes), whatever else runs on the machine.
    """
    results = {}
    for count in workers:
        wall_rates, cpu_rates = [], []
        for _ in range(repeats):
            worker_config = config.copy_and_resolve_references()
            worker_config.num_workers = count
            iterator = iter(pretrain_dataset(worker_config, LAYOUT, SAMPLER, global_batch=batch))
            try:
                for _ in range(2 * count):  # workers started, every worker's first batch done
                    next(iterator)
                wall, cpu = time.perf_counter(), process_tree_cpu_s()
                for _ in range(batches):
                    next(iterator)
                wall_rates.append(batch * batches / (time.perf_counter() - wall))
                cpu_rates.append(batch * batches / (process_tree_cpu_s() - cpu))
            finally:
                iterator.close()
        results[str(count)] = {
            "images_per_wall_s": float(np.median(wall_rates)),
            "images_per_cpu_s": float(np.median(cpu_rates)),
            "repeats_wall": [round(r, 1) for r in wall_rates],
            "repeats_cpu": [round(r, 1) for r in cpu_rates],
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpegs", type=int, default=256)
    parser.add_argument("--folder_size", type=int, default=8192)
    parser.add_argument("--jpeg_batch", type=int, default=64)
    parser.add_argument("--jpeg_batches", type=int, default=6)
    parser.add_argument("--worker_batches", type=int, default=12)
    parser.add_argument("--mnist_batch", type=int, default=256)
    parser.add_argument("--mnist_batches", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:1])  # the per-core parts: one core
    load_at_start = os.getloadavg()
    cv2.setNumThreads(1)

    results = {}
    with tempfile.TemporaryDirectory() as originals, tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(pathlib.Path(originals), args.jpegs)
        link_copies(paths, pathlib.Path(tmp), args.folder_size)
        blobs = [path.read_bytes() for path in paths]
        mean_kib = np.mean([len(b) for b in blobs]) / 1024
        data_set = (
            f"{args.jpegs} photographs 500x375 (or 375x500), JPEG quality 90, mean {mean_kib:.0f} KiB, "
            f"read through an image folder of {args.folder_size} links to them"
        )
        print(f"data: {data_set}")
        results["candidates"] = {
            "decoders": decoder_candidates(blobs[:128]),
            "resamplers": resampler_candidates([simplejpeg.decode_jpeg(b) for b in blobs[:128]]),
        }
        print("candidates done")
        results["dct_scaling"] = dct_scaling()
        current = data_config(source="image_folder", path=tmp, image_size=SIZE)
        previous = data_config(source="image_folder", path=tmp, image_size=SIZE, **PREVIOUS)
        configs = {"previous (Pillow, float32)": previous, "current (simplejpeg + OpenCV, uint8)": current}
        rates = pipeline_rates(configs, args.jpeg_batch, args.jpeg_batches)
        items = [{"image": str(p), "label": 0} for p in paths[:128]]
        results["per_core"] = {
            name: {**rates[name], "stage_us_per_image": stage_times(config, items, args.jpeg_batch)}
            for name, config in configs.items()
        }
        print("per core done")
        mnist = data_config()
        mnist_source = sources.FashionMnistSource(mnist.path, "train")
        mnist_items = [mnist_source[i] for i in range(1024)]
        results["per_core"]["fashion_mnist_28 (default)"] = {
            **pipeline_rates({"m": mnist}, args.mnist_batch, args.mnist_batches)["m"],
            "stage_us_per_image": stage_times(mnist, mnist_items, args.mnist_batch),
        }
        os.sched_setaffinity(0, allowed)  # the worker part: every allowed core
        load_before = os.getloadavg()
        results["workers"] = worker_rates(current, (1, 2), args.jpeg_batch, args.worker_batches)
        load_after = os.getloadavg()

    meta = {
        "data": data_set,
        "size": SIZE,
        "sampler": SAMPLER,
        "grid": LAYOUT.grid,
        "mask_ratio": LAYOUT.mask_ratio,
        "throw_ratio": LAYOUT.throw_ratio,
        "cpu": platform.processor() or platform.machine(),
        "cores_allowed": allowed,
        "load_average_1min_at_start": round(load_at_start[0], 2),
        "load_average_1min_around_worker_runs": [round(load_before[0], 2), round(load_after[0], 2)],
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "simplejpeg": simplejpeg.__version__,
        "opencv": cv2.__version__,
        "command": "python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline_cpu",
    }
    lines = report(results, meta)
    print("\n".join(lines))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def report(results: dict, meta: dict) -> list[str]:
    stages = ("decode", "crop_flip", "normalize", "token_noise", "sampler")
    per_core = results["per_core"]
    previous, current = (per_core[name]["images_per_cpu_s"] for name in list(per_core)[:2])
    one, two = (results["workers"][k]["images_per_wall_s"] for k in ("1", "2"))
    cpu_one, cpu_two = (results["workers"][k]["images_per_cpu_s"] for k in ("1", "2"))
    dct = results["dct_scaling"]
    lines = [
        f"`{meta['command']}`",
        "",
        f"Data: {meta['data']}, made from scikit-image's sample photographs. Crops at {meta['size']} with MAE's "
        f"scale (0.2, 1); sampler {meta['sampler']}, 14x14 grid, mask 0.75, throw 0.5. Machine: "
        f"{len(meta['cores_allowed'])} cores ({meta['cpu']}), shared with other engineers' jobs while measured "
        f"(1-min load average {meta['load_average_1min_at_start']} at the start, "
        f"{meta['load_average_1min_around_worker_runs']} around the worker runs), so the "
        "per-core rates count CPU seconds of this process and interleave the compared variants.",
        "",
        f"**Per core** (one process pinned to one core): {current:,.0f} images/s with the current default, "
        f"{current / previous:.2f}x the previous Pillow path's {previous:,.0f}/s. Multiply by the cores you "
        "give grain workers.",
        "",
        "| pipeline | images/s per core (CPU time) | images/s wall | rounds | "
        + " | ".join(f"{s} us/img" for s in stages)
        + " |",
        "|---|---|---|---|" + "---|" * len(stages),
        *[
            f"| {name} | {r['images_per_cpu_s']:,.0f} | {r['images_per_wall_s']:,.0f} | "
            f"{', '.join(f'{v:,.0f}' for v in r['rounds_images_per_cpu_s'])} | "
            + " | ".join(f"{r['stage_us_per_image'][s]:.1f}" for s in stages)
            + " |"
            for name, r in per_core.items()
        ],
        "",
        f"**Grain workers** (current default, both cores allowed): per CPU second of the main process and its "
        f"workers together, 1 worker {cpu_one:,.0f} and 2 workers {cpu_two:,.0f} images/s, against {current:,.0f} "
        "in one process: what a worker adds costs that much, and with a free core per worker the rate multiplies "
        f"by the workers. Wall clock, on this shared 2-core machine: 1 worker {one:,.0f}, 2 workers {two:,.0f} "
        f"images/s ({two / one:.2f}x), bounded by what the neighbours' jobs leave free.",
        "",
        "**Decoders** (one core, 128 of the JPEGs; `pillow_pixels`: the same pixels as Pillow's decoder):",
        "",
        "| decoder | us/img | images/s | Pillow's pixels |",
        "|---|---|---|---|",
        *[
            f"| {name} | {r['us_per_image']:.0f} | {r['images_per_s']:,.0f} | {'yes' if r['pillow_pixels'] else 'no'} |"
            for name, r in results["candidates"]["decoders"].items()
        ],
        "",
        "**Crop resamplers** (one core, the decoded JPEGs, MAE's random boxes; PSNR to Pillow's antialiased "
        "bicubic crop of the same box):",
        "",
        "| resampler | us/img | PSNR min (dB) | PSNR median (dB) |",
        "|---|---|---|---|",
        *[
            f"| {name} | {r['us_per_image']:.0f} | {r['psnr_db_min']:.1f} | {r['psnr_db_median']:.1f} |"
            for name, r in results["candidates"]["resamplers"].items()
        ],
        "",
        f"**DCT-scaled decoding** (1/2 scale where the crop keeps >= {meta['size']} px a side; {dct['crops']} crops "
        f"of photographs >= 1000 px): decode time {dct['decode_time_half_over_full']:.2f}x a full decode, crop PSNR "
        f"to the full-resolution crop min {dct['psnr_db_min']:.1f} / median {dct['psnr_db_median']:.1f} dB "
        "(Pillow on the exact fractional box). Entropy decoding, which no scaling skips, dominates (1/8 scale still "
        "costs the share in the decoder table), and at ImageNet's 500x375 no crop keeps 448 px a side, so the "
        "pipeline decodes at full size: no faithfulness given up for a saving ImageNet would not see.",
        "",
        f"Versions: Pillow {meta['pillow']} (libjpeg-turbo {meta['pillow_libjpeg_turbo']}), simplejpeg "
        f"{meta['simplejpeg']}, OpenCV {meta['opencv']}, numpy {meta['numpy']}.",
    ]
    return lines


if __name__ == "__main__":
    main()
