"""Cost report: XLA's own FLOP and memory counts of the forward pass and the train step.

    python -m prmim_jax.tools.cost --models B/16,L/16 --throw_ratios 0.25,0.5,0.65 \\
        --batch 64 --out benchmarks/results/cost_cpu
    python -m prmim_jax.tools.cost --framework simmim --models B/16 --throw_ratios 0.3 --batch 64 \\
        --out benchmarks/results/cost_simmim_cpu
    python -m prmim_jax.tools.cost --framework localmim --models B/16 --throw_ratios 0.65 --batch 64 \\
        --out benchmarks/results/cost_localmim_cpu
    python -m prmim_jax.tools.cost --framework mff --models B/16 --throw_ratios 0.5 --batch 64 \\
        --out benchmarks/results/cost_mff_cpu
    python -m prmim_jax.tools.cost --framework tec --models B/16 --throw_ratios 0.5 --batch 64 \\
        --out benchmarks/results/cost_tec_cpu
    python -m prmim_jax.tools.cost --framework greenmim --models B --throw_ratios 0.5 --batch 64 \\
        --out benchmarks/results/cost_greenmim_cpu
    python -m prmim_jax.tools.cost --models B/16 --throw_ratios 0.5 --aggregators dwconv,transformer,convnext,avgpool \\
        --kernel_sizes 3,5,7,9,11 --batch 64 --out benchmarks/results/cost_aggregators_cpu

compiles (never runs) the objective and the whole train step (loss, gradient,
AdamW update) of each model for the framework's baseline (``mae``,
``simmim``) and, at each throwing ratio, for ``partial`` and ``prmim`` (one
row per aggregator design and window), and reports per image:

- ``forward_flops``: the objective's forward pass (``compiled.cost_analysis()``),
- ``step_flops``: the train step,
- ``temp_bytes``: the train step's peak temporary memory for the whole batch
  (``compiled.memory_analysis().temp_size_in_bytes``: activations and
  workspace, not parameters or optimizer state),

each absolute and as a ratio to the baseline. A method with a frozen teacher
(TEC) also gets ``teacher_flops``, its teacher's forward pass (in both
counts above, never differentiated), and ``student_flops``, the forward
pass without it, with its ratio. XLA counts a multiply-add as two FLOPs;
the paper counts MACs (fvcore), so compare ratios. Writes ``OUT.json`` (one
object per row) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import flax.linen as nn
import jax
import ml_collections

from prmim_jax import methods, optim, runs, train_step
from prmim_jax.data import schema


def abstract_inputs(method, batch: int):
    """Shape-only ``(state, batch)`` of any method, for compiling its train step without allocating anything."""
    tx = method.optimizer(batch, 1000)
    state = jax.eval_shape(lambda: nn.unbox(runs.init_state(method, tx, jax.random.key(0), batch)))
    return state, method.batch_spec(batch)


def measure(method, batch: int, accum_steps: int = 1) -> dict:
    """Per-image forward and step FLOPs and the step's temporary bytes of any method, from compiled XLA programs;
    the step computes the batch in ``accum_steps`` microbatches (``train_step``)."""
    state, data = abstract_inputs(method, batch)

    def forward(variables, data):
        return method.loss(variables, data, jax.random.key(0))[0]

    forward_cost = jax.jit(forward).lower(state.variables, data).compile().cost_analysis()
    step = jax.jit(functools.partial(train_step.train_step, method=method, accum_steps=accum_steps), donate_argnums=0)
    compiled = step.lower(state, data, jax.random.key(0)).compile()
    row = {
        "forward_flops": forward_cost["flops"] / batch,
        "step_flops": compiled.cost_analysis()["flops"] / batch,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }
    targets = getattr(method, "targets", None)  # a frozen teacher's forward pass (TEC)
    if targets is not None:
        teacher = jax.jit(targets).lower(state.frozen, data["images"]).compile().cost_analysis()
        row["teacher_flops"] = teacher["flops"] / batch
        row["student_flops"] = row["forward_flops"] - row["teacher_flops"]
    return row


# How a row names its encoder's family ('B/16' -> 'ViT-B/16'; GreenMIM's 'B' -> 'Swin-B').
FAMILY_NAMES = {"vit": "ViT", "simmim_vit": "ViT", "swin": "Swin"}
# How a row names its variant, as the paper's tables do.
ROW_NAMES = {"full": "{framework}", "partial": "partial", "progressive": "prmim"}


def plans(framework: str, throw_ratios, aggregators=("dwconv",), kernel_sizes=(7,)) -> list[dict]:
    """Method-section overrides of each row: the baseline, then partial and PR-MIM (each aggregator and
    kernel) at each throwing ratio, furthest sampling."""
    rows = [dict(reconstruction="full")]
    for ratio in throw_ratios:
        rows.append(dict(reconstruction="partial", sampler="furthest", throw_ratio=ratio))
        for aggregator in aggregators:
            for kernel in kernel_sizes:
                rows.append(
                    dict(
                        reconstruction="progressive",
                        sampler="furthest",
                        throw_ratio=ratio,
                        aggregator=aggregator,
                        kernel_size=kernel,
                    )
                )
    return rows


def model_config(framework: str, variant: str, **overrides) -> ml_collections.ConfigDict:
    """The ``framework``'s model section (its ``Registration``'s defaults) at ``variant`` with ``overrides``."""
    config = methods.registration(framework).model(None)
    config.update(variant=variant, **overrides)
    return config


def build_method(framework: str, model_config, overrides: dict):
    """The ``framework`` method (a module of ``prmim_jax.methods``) with ``model_config`` and ``overrides``; the
    keys its ``Registration.placeholders`` give stand in for inputs that compiling never reads."""
    placeholders = methods.registration(framework).placeholders
    section = methods.method_config(framework, **(placeholders | overrides))
    config = ml_collections.ConfigDict(
        dict(model=model_config, method=section, optimizer=optim.optimizer_config(), data=schema.data_config())
    )
    return methods.build(config)


def report(
    variants,
    throw_ratios,
    batch: int,
    image_size: int = 224,
    dtype: str = "float32",
    log=print,
    framework: str = "mae",
    aggregators=("dwconv",),
    kernel_sizes=(7,),
    **model_overrides,
) -> list[dict]:
    """One row per (model, variant, rho_d, aggregator, kernel): the framework's baseline first (ratios are to
    it), then ``partial`` and ``prmim`` at each ratio (``plans``)."""
    rows = []
    for variant in variants:
        model = model_config(framework, variant, image_size=image_size, dtype=dtype, **model_overrides)
        baseline = None
        for overrides in plans(framework, throw_ratios, aggregators, kernel_sizes):
            method = build_method(framework, model, overrides)
            section = method.config.method
            progressive = section.reconstruction == "progressive"
            family = method.encoder()[0].architecture["family"]
            row = {
                "model": f"{FAMILY_NAMES[family]}-{variant}",
                "method": ROW_NAMES[section.reconstruction].format(framework=framework),
                "framework": framework,
                "sampler": section.sampler,
                "rho_d": section.throw_ratio,
                "aggregator": section.aggregator if progressive else None,
                "kernel_size": section.kernel_size if progressive else None,
            }
            row |= measure(method, batch)
            baseline = baseline or row
            for key in ("forward_flops", "step_flops", "temp_bytes", "student_flops"):
                if key in row:
                    row[f"{key}_ratio"] = row[key] / baseline[key]
            rows.append(row)
            design = f"{row['aggregator']} k={row['kernel_size']}" if progressive else ""
            log(
                f"{row['model']:9s} {row['method']:8s} rho_d={row['rho_d']:<4} {design:16s} "
                f"fwd {row['forward_flops'] / 1e9:7.2f} GFLOPs ({row['forward_flops_ratio']:.3f})  "
                f"step {row['step_flops'] / 1e9:7.2f} ({row['step_flops_ratio']:.3f})  "
                f"temp {row['temp_bytes'] / 2**20:8.0f} MiB ({row['temp_bytes_ratio']:.3f})"
                + (
                    f"  w/o teacher {row['student_flops'] / 1e9:.2f} ({row['student_flops_ratio']:.3f})"
                    if "student_flops" in row
                    else ""
                )
            )
    return rows


def _design(row: dict) -> str:
    return f"{row['aggregator']} {row['kernel_size']}x{row['kernel_size']}" if row.get("aggregator") else ""


def markdown(rows: list[dict], batch: int) -> str:
    teacher = "teacher_flops" in rows[0]  # the forward pass with and without a frozen teacher's
    lines = [
        f"Per image; temporary memory for a batch of {batch}. Ratios are to the framework's baseline "
        "(first row of each model).",
        "",
        "| model | method | sampler | rho_d | aggregator | forward GFLOPs | ratio | step GFLOPs | ratio "
        "| step temp MiB | ratio |" + (" teacher GFLOPs | forward w/o teacher GFLOPs | ratio |" if teacher else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if teacher else ""),
    ]
    for r in rows:
        line = (
            f"| {r['model']} | {r['method']} | {r['sampler']} | {r['rho_d']} | {_design(r)} | {r['forward_flops'] / 1e9:.2f} | "
            f"{r['forward_flops_ratio']:.3f} | {r['step_flops'] / 1e9:.2f} | {r['step_flops_ratio']:.3f} | "
            f"{r['temp_bytes'] / 2**20:.0f} | {r['temp_bytes_ratio']:.3f} |"
        )
        if teacher:
            line += (
                f" {r['teacher_flops'] / 1e9:.2f} | {r['student_flops'] / 1e9:.2f} | {r['student_flops_ratio']:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="B/16,L/16", help="comma-separated variants: ViT's B/16,L/16; GreenMIM's Swin B,L"
    )
    parser.add_argument("--throw_ratios", default="0.25,0.5,0.65")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--framework", default="mae", choices=methods.registered())
    parser.add_argument("--aggregators", default="dwconv", help="PR-MIM rows for each: dwconv,transformer,...")
    parser.add_argument("--kernel_sizes", default="7", help="PR-MIM rows for each aggregation window, e.g. 3,5,7")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    rows = report(
        args.models.split(","),
        [float(r) for r in args.throw_ratios.split(",")],
        args.batch,
        args.image_size,
        args.dtype,
        framework=args.framework,
        aggregators=args.aggregators.split(","),
        kernel_sizes=[int(k) for k in args.kernel_sizes.split(",")],
    )
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = ("model", "method", "sampler", "rho_d", "forward_flops", "step_flops", "temp_bytes")
        keys += tuple(
            k for k in ("framework", "aggregator", "kernel_size", "teacher_flops", "student_flops") if k in rows[0]
        )
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
