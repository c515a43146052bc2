"""Train-step speed, memory and model FLOPs utilisation of mae, partial and prmim, side by side.

    python benchmarks/step_time.py --variant B/16 --dtype bfloat16 --batch 512 --out benchmarks/results/gpu_h100
    python benchmarks/step_time.py --variant Ti/4 --image_size 32 --decoder_depth 1 --batch 4 --steps 2  # CPU smoke

For each method the whole train step (forward, backward, AdamW) is compiled on
synthetic data and timed over ``--steps`` steps after two warm-up steps; the
methods are timed in interleaved rounds so machine noise hits all of them alike.
Reported per method: images/s, step time relative to MAE, peak device memory
(the allocator's peak where the backend reports it, else XLA's compiled
temporary + argument sizes), XLA's FLOPs per step, and MFU = achieved FLOP/s over
the card's dense peak (bf16 or fp32 by ``--dtype``) where the card is known.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.linen as nn
import jax
import numpy as np

from prmim_jax import masking, methods, optim, train_step
from prmim_jax.models import mae as mae_lib

# Dense (no sparsity) peak TFLOP/s by device kind substring: (bf16, fp32).
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),  # SXM; the PCIe card is lower
    "A100": (312.0, 19.5),
    "L4": (121.0, 30.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
}


def peak_flops(device, dtype: str) -> float | None:
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return 1e12 * (bf16 if dtype == "bfloat16" else fp32)
    return None


def prepare(model_config, method_name: str, throw_ratio: float, batch: int, seed: int = 0):
    model, method = methods.build(model_config, methods.method_config(method_name, throw_ratio=throw_ratio))
    image_shape = (batch, *model.image_size, model.channels)
    tx = optim.build_optimizer(optim.optimizer_config(), global_batch=batch, total_steps=1000)
    state = nn.unbox(train_step.init_state(model, method, tx, jax.random.key(seed), image_shape))
    rng = np.random.default_rng(seed)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(batch)]))
    data = jax.device_put(train_step.make_batch(rng.normal(size=image_shape).astype(np.float32), ids))
    step = train_step.jit_train_step(model, method, donate_argnums=0)
    compiled = step.lower(state, data, jax.random.key(0)).compile()
    return {"state": state, "data": data, "compiled": compiled, "flops": compiled.cost_analysis()["flops"]}


def run(args) -> list[dict]:
    model_config = mae_lib.model_config(
        args.variant,
        image_size=args.image_size,
        dtype=args.dtype,
        decoder_width=args.decoder_width,
        decoder_depth=args.decoder_depth,
    )
    plans = [("mae", 0.0), ("partial", args.throw_ratio), ("prmim", args.throw_ratio)]
    device = jax.devices()[0]
    rows = []
    for name, throw_ratio in plans:
        prepared = prepare(model_config, name, throw_ratio, args.batch)
        memory = prepared["compiled"].memory_analysis()
        rows.append(
            {
                "method": name,
                "rho_d": throw_ratio,
                "flops_per_step": prepared["flops"],
                "compiled_bytes": int(memory.temp_size_in_bytes + memory.argument_size_in_bytes),
                **prepared,
            }
        )
    for row in rows:  # warm-up
        for _ in range(2):
            row["state"], metrics = row["compiled"](row["state"], row["data"], jax.random.key(0))
        jax.block_until_ready(metrics)
        row["seconds"] = []
    for _ in range(args.rounds):
        for row in rows:
            start = time.perf_counter()
            for _ in range(args.steps):
                row["state"], metrics = row["compiled"](row["state"], row["data"], jax.random.key(0))
            jax.block_until_ready(metrics)
            row["seconds"].append((time.perf_counter() - start) / args.steps)
    stats = device.memory_stats() or {}
    peak = peak_flops(device, args.dtype)
    results = []
    for row in rows:
        step_seconds = float(np.median(row["seconds"]))
        results.append(
            {
                "method": row["method"],
                "rho_d": row["rho_d"],
                "batch": args.batch,
                "images_per_second": args.batch / step_seconds,
                "step_seconds": step_seconds,
                "step_time_vs_mae": step_seconds / float(np.median(rows[0]["seconds"])),
                "flops_per_step": row["flops_per_step"],
                "mfu": row["flops_per_step"] / step_seconds / peak if peak else None,
                "compiled_memory_bytes": row["compiled_bytes"],
            }
        )
    meta = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "variant": args.variant,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "allocator_peak_bytes_all_methods": stats.get("peak_bytes_in_use"),
        "peak_flops": peak,
    }
    return results, meta


def markdown(results, meta) -> str:
    lines = [
        f"Train step, ViT-{meta['variant']} at {meta['image_size']}px, {meta['dtype']}, on {meta['device']} ({meta['backend']}); "
        f"allocator peak over the run: {meta['allocator_peak_bytes_all_methods']} bytes.",
        "",
        "| method | rho_d | batch | images/s | step time / MAE | TFLOPs per step | MFU | compiled memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['rho_d']} | {r['batch']} | {r['images_per_second']:,.0f} | {r['step_time_vs_mae']:.3f} | "
            f"{r['flops_per_step'] / 1e12:.3f} | {mfu} | {r['compiled_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--throw_ratio", type=float, default=0.5)
    parser.add_argument("--decoder_width", type=int, default=512)
    parser.add_argument("--decoder_depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results, meta = run(args)
    table = markdown(results, meta)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
    return results, meta


if __name__ == "__main__":
    main()
