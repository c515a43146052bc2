"""Token-sampler throughput on one CPU core, and the coverage statistic of the paper's Fig. 5.

    taskset -c 0 python benchmarks/samplers.py --out benchmarks/results/samplers_cpu

Throughput: images/s of each sampler at the ViT-B geometry (14x14 grid, mask
0.75, throw 0.5), counting both halves of the host work: every image drawing
its own noise from its own generator (as a grain ``RandomMap`` does) and the
vectorised sampler over a batch. Best of several repeats.

Coverage: the fraction of thrown tokens with no visible or decoded token in
their k x k window (nothing for a k x k aggregation to read), for k = 3, 5, 7
and rho_d = 0.25, 0.5, 0.65, over 4096 images.

Throw granularity (SimMIM's unit masks, ``prmim_jax.masking``'s "Why tokens by
default"): the same coverage at SimMIM's ViT-B/16 geometry (14x14 tokens in 2x2
units, mask ratio 0.6) for thrown tokens chosen one by one or as whole units,
and the furthest sampler's throughput either way.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

from prmim_jax import masking

THROWING = ("random_throw", "furthest", "furthest_seeded")


def draw_batch_noise(generators, layout):
    return np.stack([masking.draw_noise(g, layout) for g in generators])


def throughput(sampler: str, layout: masking.TokenLayout, batch: int, repeats: int) -> float:
    generators = [np.random.default_rng(i) for i in range(batch)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        masking.sample(sampler, draw_batch_noise(generators, layout), layout)
        best = min(best, time.perf_counter() - start)
    return batch / best


def image_noise(layout: masking.TokenLayout, images: int) -> np.ndarray:
    """The noise of ``images`` images, image ``i`` from generator ``i``."""
    return draw_batch_noise([np.random.default_rng(i) for i in range(images)], layout)


def uncovered(ids: masking.TokenIds, layout: masking.TokenLayout) -> dict:
    """``uncovered_kxk``: the fraction of thrown tokens with nothing in their k x k window, k = 3, 5, 7."""
    return {f"uncovered_{k}x{k}": masking.uncovered_fraction(ids, layout, k) for k in (3, 5, 7)}


def coverage(images: int = 4096) -> list[dict]:
    rows = []
    for throw_ratio in (0.25, 0.5, 0.65):
        layout = masking.TokenLayout((14, 14), 0.75, throw_ratio)
        noise = image_noise(layout, images)
        for sampler in THROWING:
            rows.append(
                {"sampler": sampler, "rho_d": throw_ratio} | uncovered(masking.sample(sampler, noise, layout), layout)
            )
    return rows


SIMMIM_GRID, SIMMIM_UNIT, SIMMIM_MASK_RATIO = (14, 14), 2, 0.6
SIMMIM_THROW_RATIOS = (0.3, 0.45)  # the paper's rho_d for SimMIM, and a higher one


def simmim_layout(throw_ratio: float, granularity: str) -> masking.TokenLayout:
    return masking.TokenLayout(SIMMIM_GRID, SIMMIM_MASK_RATIO, throw_ratio, SIMMIM_UNIT, granularity)


def granularity_coverage(images: int = 4096) -> list[dict]:
    """Coverage of thrown tokens at SimMIM's geometry, thrown as tokens or as whole units."""
    rows = []
    for throw_ratio in SIMMIM_THROW_RATIOS:
        layouts = {g: simmim_layout(throw_ratio, g) for g in masking.THROW_GRANULARITIES}
        noise = {g: image_noise(layout, images) for g, layout in layouts.items()}  # drawn once per layout
        for sampler in ("random_throw", "furthest"):
            for granularity, layout in layouts.items():
                ids = masking.sample(sampler, noise[granularity], layout)
                row = {"rho_d": throw_ratio, "sampler": sampler, "granularity": granularity}
                rows.append(row | {"thrown": int(ids.thrown.shape[1])} | uncovered(ids, layout))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    layout = masking.TokenLayout((14, 14), 0.75, 0.5)
    mae_layout = masking.TokenLayout((14, 14), 0.75)
    speed = {"random": throughput("random", mae_layout, args.batch, args.repeats)}
    speed |= {s: throughput(s, layout, args.batch, args.repeats) for s in THROWING}
    cover = coverage()
    granular = granularity_coverage()
    granular_speed = {
        g: throughput("furthest", simmim_layout(SIMMIM_THROW_RATIOS[0], g), args.batch, args.repeats)
        for g in masking.THROW_GRANULARITIES
    }
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    meta = {
        "batch": args.batch,
        "cpu": platform.processor() or platform.machine(),
        "cores_allowed": cores,
        "numpy": np.__version__,
    }
    lines = [
        f"Sampler throughput, ViT-B geometry (14x14, mask 0.75, throw 0.5), batch {args.batch}, cores {cores}:",
        "",
        "| sampler | images/s |",
        "|---|---|",
        *[f"| {s} | {v:,.0f} |" for s, v in speed.items()],
        "",
        "Fraction of thrown tokens with no visible or decoded token in their k x k window (4096 images):",
        "",
        "| sampler | rho_d | 3x3 | 5x5 | 7x7 |",
        "|---|---|---|---|---|",
        *[
            f"| {r['sampler']} | {r['rho_d']} | {r['uncovered_3x3']:.4f} | {r['uncovered_5x5']:.4f} | {r['uncovered_7x7']:.4f} |"
            for r in cover
        ],
        "",
        f"Throw granularity at SimMIM's ViT-B/16 geometry (14x14 tokens, 2x2-token units, mask ratio "
        f"{SIMMIM_MASK_RATIO}), 4096 images: fraction of thrown tokens with no visible or decoded token in their "
        "k x k window:",
        "",
        "| rho_d | sampler | thrown as | tokens thrown | 3x3 | 5x5 | 7x7 |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['rho_d']} | {r['sampler']} | {r['granularity']}s | {r['thrown']} | {r['uncovered_3x3']:.4f} | "
            f"{r['uncovered_5x5']:.4f} | {r['uncovered_7x7']:.4f} |"
            for r in granular
        ],
        "",
        f"Furthest sampling at rho_d {SIMMIM_THROW_RATIOS[0]} on that geometry, images/s: "
        + ", ".join(f"thrown as {g}s {v:,.0f}" for g, v in granular_speed.items()),
    ]
    print("\n".join(lines))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "throughput": speed,
                    "coverage": cover,
                    "granularity_coverage": granular,
                    "granularity_throughput": granular_speed,
                    "meta": meta,
                },
                indent=1,
            )
            + "\n"
        )
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
