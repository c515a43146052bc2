"""Cost report: XLA's own FLOP and memory counts of the forward pass and the train step.

    python -m prmim_jax.tools.cost --models B/16,L/16 --throw_ratios 0.25,0.5,0.65 \\
        --batch 64 --out benchmarks/results/cost_cpu

compiles (never runs) the objective and the whole train step (loss, gradient,
AdamW update) of each model for ``mae`` and, at each throwing ratio, for
``partial`` and ``prmim``, and reports per image:

- ``forward_flops``: the objective's forward pass (``compiled.cost_analysis()``),
- ``step_flops``: the train step,
- ``temp_bytes``: the train step's peak temporary memory for the whole batch
  (``compiled.memory_analysis().temp_size_in_bytes``: activations and
  workspace, not parameters or optimizer state),

each absolute and as a ratio to MAE. XLA counts a multiply-add as two FLOPs;
the paper counts MACs (fvcore), so compare ratios. Writes ``OUT.json`` (one
object per row) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax import masking, methods, optim, train_step
from prmim_jax.models import mae as mae_lib


def abstract_inputs(model, method, batch: int):
    """Shape-only ``(state, batch)`` for compiling the train step without allocating anything."""
    image_shape = (batch, *model.image_size, model.channels)
    tx = optim.build_optimizer(optim.optimizer_config(), global_batch=batch, total_steps=1000)
    state = jax.eval_shape(lambda: nn.unbox(train_step.init_state(model, method, tx, jax.random.key(0), image_shape)))
    layout = method.layout
    ids = masking.TokenIds(
        *(
            jax.ShapeDtypeStruct((batch, n), jnp.int32)
            for n in (layout.num_visible, layout.num_decoded, layout.num_thrown)
        )
    )
    return state, train_step.make_batch(jax.ShapeDtypeStruct(image_shape, jnp.float32), ids)


def measure(model, method, batch: int) -> dict:
    """Per-image forward and step FLOPs and the step's temporary bytes, from compiled XLA programs."""
    state, data = abstract_inputs(model, method, batch)

    def forward(params, data):
        return method.loss(model, params, data["images"], train_step.batch_ids(data))

    forward_cost = jax.jit(forward).lower(state.params, data).compile().cost_analysis()
    step = train_step.jit_train_step(model, method, donate_argnums=0).lower(state, data, jax.random.key(0)).compile()
    return {
        "forward_flops": forward_cost["flops"] / batch,
        "step_flops": step.cost_analysis()["flops"] / batch,
        "temp_bytes": int(step.memory_analysis().temp_size_in_bytes),
    }


def report(
    variants, throw_ratios, batch: int, image_size: int = 224, dtype: str = "float32", log=print, **model_overrides
) -> list[dict]:
    """One row per (model, method, rho_d): ``mae`` first, then ``partial`` and ``prmim`` at each ratio."""
    rows = []
    for variant in variants:
        model_config = mae_lib.model_config(variant, image_size=image_size, dtype=dtype, **model_overrides)
        plans = [("mae", "random", 0.0)] + [(m, "furthest", r) for r in throw_ratios for m in ("partial", "prmim")]
        baseline = None
        for name, sampler, throw_ratio in plans:
            model, method = methods.build(
                model_config, methods.method_config(name, sampler=sampler, throw_ratio=throw_ratio)
            )
            row = {"model": f"ViT-{variant}", "method": name, "sampler": sampler, "rho_d": throw_ratio}
            row |= measure(model, method, batch)
            baseline = baseline or row
            for key in ("forward_flops", "step_flops", "temp_bytes"):
                row[f"{key}_ratio"] = row[key] / baseline[key]
            rows.append(row)
            log(
                f"{row['model']:9s} {name:8s} rho_d={throw_ratio:<4} fwd {row['forward_flops'] / 1e9:7.2f} GFLOPs "
                f"({row['forward_flops_ratio']:.3f})  step {row['step_flops'] / 1e9:7.2f} ({row['step_flops_ratio']:.3f})  "
                f"temp {row['temp_bytes'] / 2**20:8.0f} MiB ({row['temp_bytes_ratio']:.3f})"
            )
    return rows


def markdown(rows: list[dict], batch: int) -> str:
    lines = [
        f"Per image; temporary memory for a batch of {batch}. Ratios are to MAE of the same model.",
        "",
        "| model | method | sampler | rho_d | forward GFLOPs | ratio | step GFLOPs | ratio | step temp MiB | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['sampler']} | {r['rho_d']} | {r['forward_flops'] / 1e9:.2f} | "
            f"{r['forward_flops_ratio']:.3f} | {r['step_flops'] / 1e9:.2f} | {r['step_flops_ratio']:.3f} | "
            f"{r['temp_bytes'] / 2**20:.0f} | {r['temp_bytes_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="B/16,L/16", help="comma-separated ViT variants, e.g. B/16,L/16")
    parser.add_argument("--throw_ratios", default="0.25,0.5,0.65")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    rows = report(
        args.models.split(","),
        [float(r) for r in args.throw_ratios.split(",")],
        args.batch,
        args.image_size,
        args.dtype,
    )
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = ("model", "method", "sampler", "rho_d", "forward_flops", "step_flops", "temp_bytes")
        meta = {
            "batch": args.batch,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "backend": jax.default_backend(),
        }
        out.with_suffix(".json").write_text(json.dumps([{k: r[k] for k in keys} | meta for r in rows], indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, args.batch))
    return rows


if __name__ == "__main__":
    main()
