"""GreenMIM's cost on Swin: GreenMIM, + partial and + PR-MIM (rho_d 0.5) against a dense Swin forward.

    python benchmarks/greenmim_cost.py --out benchmarks/results/cost_greenmim_cpu

The rows are ``prmim_jax.tools.cost``'s (XLA's compiled counts per image: the objective's forward FLOPs,
the train step's FLOPs, the step's temporary memory for the batch). The reference is the dense Swin of the
same size on all tokens: its encoder forward FLOPs and the temporary memory of a forward + backward pass of
the encoder (a sum of squares of its features as the loss), which is what a SimMIM-style dense pretraining
spends on the encoder before its light head. GreenMIM's own claim, "about 2x faster than SimMIM on Swin",
is the anchor; its encoder reads 12 of 49 units (a quarter of the tokens).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax.models import greenmim, swin
from prmim_jax.tools import cost


def dense_swin(variant: str, batch: int, image_size: int, window_size: int) -> dict:
    """The dense Swin's per-image encoder forward FLOPs and its forward + backward temporary bytes for ``batch``."""
    config = greenmim.model_config(variant, image_size=image_size, window_size=window_size)
    model = swin.build_swin(config)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(images.shape))["params"]))

    def forward(params, images):
        return jnp.sum(jnp.square(model.apply({"params": params}, images).features.astype(jnp.float32)))

    forward_cost = jax.jit(forward).lower(params, images).compile().cost_analysis()
    backward = jax.jit(jax.grad(forward)).lower(params, images).compile()
    return {
        "forward_flops": forward_cost["flops"] / batch,
        "step_flops": backward.cost_analysis()["flops"] / batch,
        "temp_bytes": int(backward.memory_analysis().temp_size_in_bytes),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B")
    parser.add_argument("--window_size", type=int, default=7)
    parser.add_argument("--throw_ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    dense = dense_swin(args.variant, args.batch, args.image_size, args.window_size)
    print(
        f"dense Swin-{args.variant}: fwd {dense['forward_flops'] / 1e9:.2f} GFLOPs, fwd+bwd temp "
        f"{dense['temp_bytes'] / 2**20:.0f} MiB"
    )
    rows = cost.report(
        [args.variant],
        [args.throw_ratio],
        args.batch,
        args.image_size,
        framework="greenmim",
        window_size=args.window_size,
    )
    for row in rows:
        row["forward_flops_to_dense"] = row["forward_flops"] / dense["forward_flops"]
        row["temp_bytes_to_dense"] = row["temp_bytes"] / dense["temp_bytes"]
    lines = [
        f"Swin-{args.variant} (window {args.window_size}) at {args.image_size}, batch {args.batch}, float32, XLA "
        f"{jax.default_backend().upper()} compiled counts per image; temporary memory for the batch.",
        "",
        "| method | rho_d | forward GFLOPs | to GreenMIM | to dense Swin fwd | step GFLOPs | to GreenMIM "
        "| step temp MiB | to GreenMIM | to dense Swin fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense Swin-{args.variant} encoder (all 3136 tokens; fwd, fwd+bwd) | | {dense['forward_flops'] / 1e9:.2f} "
        f"| | 1 | {dense['step_flops'] / 1e9:.2f} | | {dense['temp_bytes'] / 2**20:.0f} | | 1 |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rho_d']} | {r['forward_flops'] / 1e9:.2f} | {r['forward_flops_ratio']:.3f} | "
            f"{r['forward_flops_to_dense']:.3f} | {r['step_flops'] / 1e9:.2f} | {r['step_flops_ratio']:.3f} | "
            f"{r['temp_bytes'] / 2**20:.0f} | {r['temp_bytes_ratio']:.3f} | {r['temp_bytes_to_dense']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(batch=args.batch, image_size=args.image_size, window_size=args.window_size)
        keys = ("model", "method", "rho_d", "forward_flops", "step_flops", "temp_bytes", "forward_flops_to_dense")
        records = [{"method": "dense_swin_encoder"} | dense | meta] + [{k: r[k] for k in keys} | meta for r in rows]
        out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
