"""What each aggregation design of the paper's Tables 11 and 12 costs, from XLA's compiled programs.

    python benchmarks/aggregators.py --out benchmarks/results/aggregators_cpu

Compiles each aggregator of ``prmim_jax.models.aggregate`` alone at ViT-B's
decoder (grid 14x14, C = 512, rho_e 0.75, rho_d 0.5: 98 thrown tokens from
furthest-sampled ids), forward and forward + backward (gradients of the
parameters and of the present features), for kernel sizes 3 to 11, and reads
``compiled.cost_analysis()["flops"]`` per image and the backward program's
``memory_analysis().temp_size_in_bytes``. Next to them: the paper's GFLOPs
(fvcore MACs over the whole grid), that count recomputed from the formula, and
the MACs of what our modules compute (the pointwise parts at the thrown tokens
only). XLA counts 2 FLOPs per multiply-add plus every elementwise op
(LayerNorm, GELU, softmax, adds), so its forward count is about twice our MACs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax import masking
from prmim_jax.models import aggregate

KERNEL_SIZES = (3, 5, 7, 9, 11)
# The paper's Table 11 (ViT-B, 100 epochs, top-1 by kernel size of the depth-wise aggregation) and
# Table 12 (top-1 and GFLOPs by design; fvcore counts MACs and calls them FLOPs).
PAPER_TOP1_BY_KERNEL = {3: 81.7, 5: 81.7, 7: 81.8, 9: 81.7, 11: 81.6}
PAPER_TABLE_12 = {
    "dwconv": (81.8, 7.3e-3),
    "transformer": (81.8, 0.65),
    "convnext": (81.7, 0.41),
    "avgpool": ("fail", None),
}


def macs_per_image(design: str, kernel_size: int, tokens: int, thrown: int, width: int, whole_grid: bool) -> int:
    """Multiply-adds of one image's forward pass; ``whole_grid`` is the paper's form (every grid token)."""
    mlp = 2 * 4 * width * width  # C -> 4C -> C
    read = tokens if whole_grid else thrown
    if design == "dwconv":
        return tokens * kernel_size**2 * width
    if design == "convnext":
        return tokens * kernel_size**2 * width + read * mlp
    if design == "transformer":
        # Attention over every token: q, k, v, out projections, scores and their product with the values.
        attention = 4 * tokens * width * width + 2 * tokens * tokens * width
        return attention + read * mlp
    return 0  # avgpool: additions only


def xla_costs(module: nn.Module, features, ids_present, ids_thrown) -> dict:
    """XLA's FLOPs of the forward and forward + backward programs, per batch, and the backward's temp bytes."""
    variables = nn.unbox(jax.jit(module.init)(jax.random.key(0), features, ids_present, ids_thrown))
    cotangent = jnp.ones((*ids_thrown.shape, features.shape[-1]), features.dtype)

    def forward(variables, features, ids_present, ids_thrown):
        return module.apply(variables, features, ids_present, ids_thrown)

    def forward_backward(variables, features, ids_present, ids_thrown):
        def contracted(variables, features):
            return jnp.vdot(forward(variables, features, ids_present, ids_thrown), cotangent)

        # The value too: with gradients alone XLA drops the forward of a linear aggregator as dead code.
        return jax.value_and_grad(contracted, argnums=(0, 1))(variables, features)

    start = time.perf_counter()
    args = (variables, features, ids_present, ids_thrown)
    fwd = jax.jit(forward).lower(*args).compile()
    bwd = jax.jit(forward_backward).lower(*args).compile()
    return {
        "forward_flops": _flops(fwd),
        "forward_backward_flops": _flops(bwd),
        "forward_backward_temp_bytes": int(bwd.memory_analysis().temp_size_in_bytes),
        # A grouped convolution's kernel gradient would compile to a dense C x C convolution on CPU.
        "convolutions": sum(program.as_text().count(" convolution(") for program in (fwd, bwd)),
        "compile_s": time.perf_counter() - start,
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def rows_to_measure():
    """``(design, kernel_size, whole_grid)`` of every row of the table."""
    rows = [("dwconv", k, False) for k in KERNEL_SIZES]
    rows += [("convnext", k, False) for k in KERNEL_SIZES] + [("convnext", 7, True)]
    rows += [("transformer", 7, False), ("transformer", 7, True)]
    rows += [("avgpool", k, False) for k in KERNEL_SIZES]
    return rows


def measure(batch: int, width: int, throw_ratio: float, heads: int) -> list[dict]:
    layout = masking.TokenLayout((14, 14), 0.75, throw_ratio)
    rng = np.random.default_rng(0)
    ids = masking.sample("furthest", np.stack([masking.draw_noise(rng, layout) for _ in range(batch)]), layout)
    ids_present = jnp.asarray(np.concatenate([ids.visible, ids.decoded], axis=1))
    ids_thrown = jnp.asarray(ids.thrown)
    features = jnp.asarray(rng.normal(size=(batch, ids_present.shape[1], width)).astype(np.float32))
    results = []
    for design, kernel_size, whole_grid in rows_to_measure():
        options = {"whole_grid": whole_grid, "num_heads": heads}
        module = aggregate.build_aggregator(design, layout.grid, kernel_size, jnp.float32, width, **options)
        costs = xla_costs(module, features, ids_present, ids_thrown)
        row = {
            "design": design,
            "kernel_size": None if design == "transformer" else kernel_size,
            "whole_grid": whole_grid,
            "paper_gmacs": PAPER_TABLE_12[design][1] if kernel_size == 7 else None,
            "paper_form_gmacs": macs_per_image(design, kernel_size, layout.num_tokens, layout.num_thrown, width, True)
            / 1e9,
            "computed_gmacs": macs_per_image(
                design, kernel_size, layout.num_tokens, layout.num_thrown, width, whole_grid
            )
            / 1e9,
            "xla_forward_gflops": costs["forward_flops"] / batch / 1e9,
            "xla_forward_backward_gflops": costs["forward_backward_flops"] / batch / 1e9,
            "xla_forward_backward_temp_mib": costs["forward_backward_temp_bytes"] / 2**20,
            "xla_convolutions": costs["convolutions"],
            "compile_s": round(costs["compile_s"], 2),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def partial_step_gflops(throw_ratio: float) -> float | None:
    """XLA's train-step GFLOPs per image of ViT-B/16 partial reconstruction at ``throw_ratio``, from
    ``results/cost_cpu.json`` (the step an aggregator is added to), or ``None`` without that result."""
    path = pathlib.Path(__file__).parent / "results" / "cost_cpu.json"
    if not path.exists():
        return None
    for row in json.loads(path.read_text()):
        if (row["model"], row["method"], row["rho_d"]) == ("ViT-B/16", "partial", throw_ratio):
            return row["step_flops"] / 1e9
    return None


def report(results: list[dict], command: str, meta: dict) -> str:
    step = partial_step_gflops(meta["throw_ratio"])
    lines = [
        "# Aggregation designs (paper Tables 11 and 12): cost per image",
        "",
        "```",
        command,
        "```",
        "",
        f"ViT-B decoder geometry: 14x14 grid (N = 196), C = {meta['width']}, rho_d = {meta['throw_ratio']} "
        f"(T = {meta['thrown']} thrown tokens, furthest sampling), batch {meta['batch']}, transformer "
        f"{meta['heads']} heads, MLP ratio 4; jax {meta['jax']} on XLA CPU ({meta['cpu']}). GMACs: multiply-adds "
        "(the paper's fvcore unit, which it calls FLOPs); GFLOPs: XLA's `cost_analysis()`, which counts 2 per "
        "multiply-add and 1 per elementwise op; temp: `memory_analysis().temp_size_in_bytes` of the forward + "
        "backward program for the whole batch.",
        "",
        "| design | k | evaluated at | paper GMACs (Table 12) | paper's form, N tokens: GMACs | ours: GMACs "
        "| XLA forward GFLOPs | XLA fwd / (2 x ours) | XLA fwd+bwd GFLOPs | fwd+bwd / fwd | fwd+bwd / step "
        "| fwd+bwd temp MiB | paper top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        design = row["design"]
        evaluated = "all N tokens" if row["whole_grid"] or design == "dwconv" else "thrown tokens"
        if design == "avgpool":
            evaluated = "all N tokens (adds only)"
        ratio = row["xla_forward_gflops"] / (2 * row["computed_gmacs"]) if row["computed_gmacs"] else None
        top1 = PAPER_TABLE_12[design][0] if row["kernel_size"] in (7, None) else None
        if design == "dwconv":
            top1 = PAPER_TOP1_BY_KERNEL[row["kernel_size"]]
        lines.append(
            f"| {design} | {_fmt(row['kernel_size'])} | {evaluated} | {_fmt(row['paper_gmacs'])} "
            f"| {_fmt(row['paper_form_gmacs'])} | {_fmt(row['computed_gmacs'])} | {_fmt(row['xla_forward_gflops'])} "
            f"| {_fmt(ratio)} | {_fmt(row['xla_forward_backward_gflops'])} "
            f"| {row['xla_forward_backward_gflops'] / row['xla_forward_gflops']:.2f} "
            f"| {_fmt(100 * row['xla_forward_backward_gflops'] / step if step else None, 2)}% "
            f"| {row['xla_forward_backward_temp_mib']:.1f} | {_fmt(top1)} |"
        )
    lines += ["", *notes(results, meta, step)]
    return "\n".join(lines) + "\n"


def notes(results: list[dict], meta: dict, step: float | None) -> list[str]:
    """How the columns relate: the paper's arithmetic, XLA's counting, and what we compute."""
    tokens, thrown, width = 196, meta["thrown"], meta["width"]
    dwconv = macs_per_image("dwconv", 7, tokens, thrown, width, True) / 1e9
    dwconv_768 = macs_per_image("dwconv", 7, tokens, thrown, 768, True) / 1e9
    transformer = macs_per_image("transformer", 7, tokens, thrown, width, True) / 1e9
    convnext = macs_per_image("convnext", 7, tokens, thrown, width, True) / 1e9
    step_line = (
        f"- *fwd+bwd / step*: the aggregator's forward + backward against XLA's train step of ViT-B/16 partial "
        f"reconstruction at rho_d = {meta['throw_ratio']} ({step:.2f} GFLOPs per image, `cost_cpu.json`), the "
        "step an aggregator is added to."
        if step
        else "- *fwd+bwd / step*: needs `results/cost_cpu.json`."
    )
    return [
        "How to read it:",
        "",
        f"- *paper's form*: the paper counts MACs (fvcore) of the module over all N = {tokens} grid tokens. "
        f"The Transformer block, `12 N C^2 + 2 N^2 C` (q, k, v, out, a 4x MLP; global attention) = {transformer:.3f}, "
        f"and the ConvNeXt block, `N (k^2 C + 8 C^2)` = {convnext:.3f}, are the paper's 0.65 and 0.41 (truncated) "
        f"at C = {width}. The depth-wise convolution, `N k^2 C` = {dwconv:.2e} at C = {width}, is not the paper's "
        f"7.3e-3; `N k^2 C` at C = 768 (ViT-B's encoder width) is {dwconv_768:.2e}, which the paper's figure "
        "matches (truncated the same way), so it was presumably counted at that width. Either way it is about "
        "1/100 of the blocks.",
        "- *ours*: what our modules compute. The ConvNeXt block's LayerNorm and MLP and the Transformer block's "
        f"MLP run at the T = {thrown} thrown tokens only, the only outputs anyone reads (the attention runs over "
        "all N tokens, as `models.attention.Attention`); the outputs are the whole-grid block's exactly "
        "(`tests/test_aggregators.py`). The `all N tokens` rows (`whole_grid=True`) compile the paper's form, and "
        "XLA's count of them is twice the paper's arithmetic plus elementwise work.",
        "- *XLA fwd / (2 x ours)*: XLA's cost analysis counts 2 FLOPs per multiply-add and 1 per elementwise op "
        "(LayerNorm, GELU, softmax, residual adds), so about 1.0 means the compiled program does the arithmetic "
        "above and nothing more. "
        + (
            "No compiled program holds an XLA convolution (so no dense `C x C` kernel gradient)."
            if not any(row["xla_convolutions"] for row in results)
            else "Some programs hold XLA convolutions: see `xla_convolutions` in the JSON."
        ),
        "- *fwd+bwd / fwd*: a backward pass costs two forward passes (input and weight gradients), so 3 is "
        "expected. The depth-wise convolution shows about 2: its kernel gradient runs as a loop over the "
        "`k^2` taps, and XLA's cost analysis counts a loop body once (2 N C of its 2 N k^2 C FLOPs).",
        "- *avgpool*: no multiply-adds, no parameters (the paper lists no FLOPs for it); XLA counts the "
        "separable box sums' additions and the division.",
        step_line,
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16, help="transformer heads (MAE's ViT-B decoder: 16)")
    parser.add_argument("--throw_ratio", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    results = measure(args.batch, args.width, args.throw_ratio, args.heads)
    layout = masking.TokenLayout((14, 14), 0.75, args.throw_ratio)
    meta = {
        "batch": args.batch,
        "width": args.width,
        "heads": args.heads,
        "throw_ratio": args.throw_ratio,
        "thrown": layout.num_thrown,
        "jax": jax.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    command = "python benchmarks/aggregators.py" + (f" --out {args.out}" if args.out else "")
    text = report(results, command, meta)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"rows": results, "meta": meta}, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
