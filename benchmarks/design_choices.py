"""The measurements behind the design choices that the model and data modules' docstrings explain.

    taskset -c 0 python benchmarks/design_choices.py --out benchmarks/results/design_choices_cpu
    python benchmarks/design_choices.py --smoke      # tiny shapes, seconds: checks the script runs

Each section backs one docstring, which keeps the reason and links here for the numbers:

- ``precision`` (``prmim_jax.models.layers``: the bfloat16 policy, ``residual_dtype``): XLA's
  temporary memory and bytes accessed of the compiled ViT-B/16 MAE train step at batch 64 in
  float32, in bfloat16 as shipped (float32 residual stream, LayerNorm emitting bfloat16), with
  a bfloat16 residual stream, and with LayerNorm emitting float32.
- ``remat`` (``prmim_jax.models.vit``): at MAE's decoder shape (8 blocks of width 512, 16
  heads, 197 tokens, batch 8), the bytes of the activations kept for the backward pass
  (the residuals of ``jax.vjp``) and XLA's compiled temporary memory of the gradient, for each
  ``remat`` policy.
- ``gelu`` (``layers.gelu``): fc1-GELU-fc2 forward + backward at MAE's decoder MLP, our
  erf-form GELU against ``jax.nn.gelu(approximate=False)``.
- ``attention`` (``attention.cpu_attention``): forward + backward of the attention core, ours
  against ``jax.nn.dot_product_attention`` (its XLA implementation), at MAE's decoder (197
  tokens, 16 heads of 32) and at the ViT-B encoder's visible tokens (50, 12 heads of 64).
- ``depthwise`` (``prmim_jax.models.aggregate``): the 7x7 depth-wise convolution's forward +
  backward at ViT-B's decoder grid (14x14, 512 channels, batch 8), ours (hand-written gradient)
  against XLA's gradient of a grouped convolution (with XLA's FLOP count of that gradient) and
  against a per-tap gather over the thrown tokens only (rho_d 0.5: 98 of 196).
- ``normalize`` (``data.transforms.Normalize``): per-pixel normalisation of a 224x224x3 image in
  numpy, channels broadcast against the rows-of-``W * C`` form.
- ``sha256`` (``prmim_jax.checkpoint_integrity``): hashlib's sha256 throughput on one core.

Timings are CPU seconds (``time.process_time``) of one thread (XLA's intra-op pool set to one
thread, run under ``taskset -c 0``), in interleaved rounds; each ratio is the median over rounds
of that round's ratio, which machine noise moves much less than absolute times.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import platform
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax import train_step
from prmim_jax.data import transforms
from prmim_jax.models import aggregate, attention, layers, vit
from prmim_jax.tools import cost

SECTIONS = ("precision", "remat", "gelu", "attention", "depthwise", "normalize", "sha256")


def use_one_thread() -> None:
    """One XLA compute thread; call before JAX starts its CPU backend (it reads the flags then)."""
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def interleaved(contestants: dict, rounds: int, repeats: int) -> dict:
    """CPU seconds per call of each ``name -> thunk`` (each called once first to compile), in interleaved
    rounds: ``{'median': {name: s}, 'ratio': {name: median over rounds of name / first}}``."""
    for thunk in contestants.values():
        thunk()
    times = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, thunk in contestants.items():
            start = time.process_time()
            for _ in range(repeats):
                thunk()
            times[name].append((time.process_time() - start) / repeats)
    first = np.array(times[next(iter(contestants))])
    return {
        "median": {name: float(np.median(t)) for name, t in times.items()},
        "ratio": {name: float(np.median(np.array(t) / first)) for name, t in times.items()},
    }


def blocking(fn, *args):
    """A thunk that runs the jitted ``fn`` on ``args`` and waits for it."""
    return lambda: jax.block_until_ready(fn(*args))


# --- precision -------------------------------------------------------------------------------


def precision(smoke: bool) -> list[dict]:
    variant, batch = ("Ti/16", 2) if smoke else ("B/16", 64)
    extra = dict(image_size=32, depth=1, decoder_width=32, decoder_depth=1, decoder_num_heads=2) if smoke else {}

    def step_counts(dtype: str) -> dict:
        method = cost.build_method("mae", cost.model_config("mae", variant, dtype=dtype, **extra), {})
        state, data = cost.abstract_inputs(method, batch)
        step = jax.jit(functools.partial(train_step.train_step, method=method), donate_argnums=0)
        compiled = step.lower(state, data, jax.random.key(0)).compile()
        return {
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "bytes_accessed": float(compiled.cost_analysis()["bytes accessed"]),
        }

    shipped_norm = vit.layer_norm

    def same_dtype(dtype):
        return jnp.dtype(dtype)

    def float32_norm(dtype, name=None, **keys):
        return shipped_norm(jnp.float32, name, **keys)

    rows = [{"step": "float32", **step_counts("float32")}]
    rows.append(
        {"step": "bfloat16 (float32 residual stream, LayerNorm emits bfloat16: shipped)", **step_counts("bfloat16")}
    )
    # vit imported the name itself, so both modules' bindings change.
    with mock.patch.object(layers, "residual_dtype", same_dtype), mock.patch.object(vit, "residual_dtype", same_dtype):
        rows.append({"step": "bfloat16, bfloat16 residual stream", **step_counts("bfloat16")})
    with mock.patch.object(vit, "layer_norm", float32_norm):
        rows.append({"step": "bfloat16, LayerNorm emits float32", **step_counts("bfloat16")})
    shipped = rows[1]
    for row in rows:
        row["temp_vs_shipped"] = row["temp_bytes"] / shipped["temp_bytes"]
        row["bytes_accessed_vs_shipped"] = row["bytes_accessed"] / shipped["bytes_accessed"]
        row |= {"variant": variant, "batch": batch}
    return rows


# --- remat -----------------------------------------------------------------------------------


def _sum_of_squares(model, params, x):
    return jnp.sum(model.apply(params, x) ** 2)


def _vjp_residuals(fn, *args):
    """The arrays ``jax.vjp(fn, *args)`` keeps for the backward pass (the leaves of its vjp function)."""
    return jax.tree.leaves(jax.vjp(fn, *args)[1])


def remat(smoke: bool) -> list[dict]:
    depth, width, heads, tokens, batch = (2, 32, 2, 17, 2) if smoke else (8, 512, 16, 197, 8)
    x = jnp.ones((batch, tokens, width), jnp.float32)
    rows = []
    for policy in vit.REMAT_POLICIES:
        model = vit.Transformer(depth, heads, 4 * width, remat=policy)
        params = model.init(jax.random.key(0), x)
        loss = functools.partial(_sum_of_squares, model)

        kept = jax.eval_shape(functools.partial(_vjp_residuals, loss), params, x)
        param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        rows.append(
            {
                "remat": policy,
                # The vjp's residuals include the parameters it reads; the activations are the rest.
                "kept_activation_bytes": sum(leaf.size * leaf.dtype.itemsize for leaf in kept) - param_bytes,
                "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            }
        )
    for row in rows:
        row["kept_vs_none"] = row["kept_activation_bytes"] / rows[0]["kept_activation_bytes"]
        row |= {"shape": f"{depth} blocks, width {width}, {heads} heads, {tokens} tokens, batch {batch}"}
    return rows


# --- gelu ------------------------------------------------------------------------------------


def gelu(smoke: bool, rounds: int) -> dict:
    tokens, width = (2 * 17, 32) if smoke else (8 * 197, 512)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (tokens, width))
    fc1 = jax.random.normal(keys[1], (width, 4 * width)) * width**-0.5
    fc2 = jax.random.normal(keys[2], (4 * width, width)) * (4 * width) ** -0.5

    def mlp_gradient(activation):
        def loss(x, fc1, fc2):
            return jnp.sum(activation(x @ fc1) @ fc2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    exact_erfc = functools.partial(jax.nn.gelu, approximate=False)
    ours, theirs = mlp_gradient(layers.gelu), mlp_gradient(exact_erfc)
    agreement = float(jnp.max(jnp.abs(layers.gelu(x * 4) - exact_erfc(x * 4))))
    timing = interleaved(
        {"jax.nn.gelu(approximate=False)": blocking(theirs, x, fc1, fc2), "layers.gelu": blocking(ours, x, fc1, fc2)},
        rounds,
        repeats=3,
    )
    return timing | {"shape": f"[{tokens}, {width}] -> {4 * width} -> {width}", "max_abs_difference": agreement}


# --- attention -------------------------------------------------------------------------------


def attention_core(smoke: bool, rounds: int) -> list[dict]:
    shapes = {"MAE decoder": (8, 197, 16, 32), "ViT-B encoder, visible tokens": (8, 50, 12, 64)}
    if smoke:
        shapes = {"MAE decoder": (2, 17, 2, 8), "ViT-B encoder, visible tokens": (2, 5, 2, 16)}
    rows = []
    for where, (batch, tokens, heads, kv) in shapes.items():
        keys = jax.random.split(jax.random.key(1), 4)
        q, k, v, do = (jax.random.normal(key, (batch, tokens, heads, kv)) for key in keys)

        def gradient(core, do=do):
            return jax.jit(jax.grad(lambda *qkv: jnp.sum(core(*qkv) * do), argnums=(0, 1, 2)))

        xla = functools.partial(jax.nn.dot_product_attention, implementation="xla")
        ours = lambda q, k, v: attention.cpu_attention(q, k, v)  # noqa: E731
        timing = interleaved(
            {
                "jax.nn.dot_product_attention": blocking(gradient(xla), q, k, v),
                "cpu_attention": blocking(gradient(ours), q, k, v),
            },
            rounds,
            repeats=3,
        )
        agreement = float(jnp.max(jnp.abs(ours(q, k, v) - xla(q, k, v))))
        rows.append(
            timing | {"where": where, "shape": f"[{batch}, {tokens}, {heads}, {kv}]", "max_abs_difference": agreement}
        )
    return rows


# --- depthwise -------------------------------------------------------------------------------


def grouped_conv(grid, kernel):
    """XLA's own depth-wise convolution: ``[B, H, W, C]``, ``[k, k, C]`` -> ``[B, H, W, C]``."""
    return jax.lax.conv_general_dilated(
        grid,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=grid.shape[-1],
    )


def gathered_taps(grid, kernel, thrown):
    """The convolution's output at the ``thrown`` tokens only (``[B, N_thr]`` flat grid indices) as ``k * k``
    gathers of shifted tokens: ``[B, N_thr, C]``."""
    size = kernel.shape[0]
    batch, _, width, channels = grid.shape
    padded = jnp.pad(grid, ((0, 0), (size // 2,) * 2, (size // 2,) * 2, (0, 0)))
    flat = padded.reshape(batch, -1, channels)
    rows, cols = jnp.divmod(thrown, width)
    out = 0.0
    for dy in range(size):
        for dx in range(size):
            index = (rows + dy) * (width + size - 1) + cols + dx
            out = out + kernel[dy, dx] * jnp.take_along_axis(flat, index[..., None], axis=1)
    return out


def depthwise(smoke: bool, rounds: int) -> dict:
    batch, side, channels, size = (2, 6, 8, 3) if smoke else (8, 14, 512, 7)
    tokens = side * side
    keys = jax.random.split(jax.random.key(2), 3)
    grid = jax.random.normal(keys[0], (batch, side, side, channels))
    kernel = jax.random.normal(keys[1], (size, size, channels)) / size
    thrown = jnp.sort(
        jax.vmap(lambda key: jax.random.permutation(key, tokens)[: tokens // 2])(jax.random.split(keys[2], batch)),
        axis=1,
    )

    def gradient(conv):
        return jax.jit(jax.grad(lambda g, w: jnp.sum(conv(g, w) ** 2), argnums=(0, 1)))

    at_thrown = lambda g, w: gathered_taps(g, w, thrown)  # noqa: E731
    xla_gradient = gradient(grouped_conv).lower(grid, kernel).compile().cost_analysis()["flops"] / batch
    ours_output, xla_output = aggregate.depthwise_conv(grid, kernel), grouped_conv(grid, kernel)
    timing = interleaved(
        {
            "depthwise_conv (whole grid)": blocking(gradient(aggregate.depthwise_conv), grid, kernel),
            "XLA grouped convolution (whole grid)": blocking(gradient(grouped_conv), grid, kernel),
            "per-tap gathers (thrown tokens only)": blocking(gradient(at_thrown), grid, kernel),
        },
        rounds,
        repeats=3,
    )
    return timing | {
        "shape": f"[{batch}, {side}, {side}, {channels}], {size}x{size}, {tokens // 2} thrown",
        "xla_grouped_gradient_flops_per_image": xla_gradient,
        "ours_direct_macs_per_image": tokens * size * size * channels,
        "max_abs_difference": float(jnp.max(jnp.abs(ours_output - xla_output))),
    }


# --- normalize -------------------------------------------------------------------------------


def normalize(smoke: bool, rounds: int) -> dict:
    side = 16 if smoke else 224
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    shipped = transforms.Normalize(mean, std)
    scale, offset = transforms._normalization(mean, std)  # the constants Normalize multiplies by

    def broadcast():
        return image.astype(np.float32) * scale + offset

    def rows():
        return shipped.map({"image": image})["image"]

    agreement = float(np.max(np.abs(broadcast() - rows())))
    timing = interleaved({"channels broadcast": broadcast, "rows of W * C (Normalize)": rows}, rounds, repeats=50)
    return timing | {"shape": f"[{side}, {side}, 3] uint8", "max_abs_difference": agreement}


# --- sha256 ----------------------------------------------------------------------------------


def sha256(smoke: bool, rounds: int) -> dict:
    data = np.random.default_rng(0).bytes((1 if smoke else 256) << 20)
    timing = interleaved({"sha256": lambda: hashlib.sha256(data).digest()}, rounds, repeats=1)
    return {"bytes": len(data), "gb_per_cpu_second": len(data) / timing["median"]["sha256"] / 1e9}


# --- report ----------------------------------------------------------------------------------


def run(sections, smoke: bool, rounds: int) -> dict:
    jobs = {
        "precision": lambda: precision(smoke),
        "remat": lambda: remat(smoke),
        "gelu": lambda: gelu(smoke, rounds),
        "attention": lambda: attention_core(smoke, rounds),
        "depthwise": lambda: depthwise(smoke, rounds),
        "normalize": lambda: normalize(smoke, rounds),
        "sha256": lambda: sha256(smoke, rounds),
    }
    return {name: jobs[name]() for name in sections}


def _timing_table(timing: dict) -> list[str]:
    lines = ["| | ms (CPU, median) | ratio |", "|---|---|---|"]
    return lines + [f"| {n} | {timing['median'][n] * 1e3:.2f} | {timing['ratio'][n]:.2f} |" for n in timing["median"]]


def markdown(result: dict, meta: dict) -> str:
    lines = [
        "Measurements behind the model and data modules' design choices (`benchmarks/design_choices.py`'s docstring "
        "says which docstring each backs). Timings: one thread, CPU seconds, "
        f"{meta['rounds']} interleaved rounds; a ratio is the median over rounds of that round's ratio to the "
        "table's first row.",
    ]
    if "precision" in result:
        rows = result["precision"]
        lines += [
            "",
            f"## precision: the {rows[0]['variant']} MAE train step at batch {rows[0]['batch']} (XLA's counts)",
            "",
            "| step | temporary memory (GB) | vs shipped | bytes accessed (GB) | vs shipped |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['step']} | {r['temp_bytes'] / 1e9:.2f} | {r['temp_vs_shipped']:.3f} | {r['bytes_accessed'] / 1e9:.1f} | "
            f"{r['bytes_accessed_vs_shipped']:.3f} |"
            for r in rows
        ]
        lines += ["", "XLA CPU computes bfloat16 arithmetic in float32, so these size the choice on the CPU only."]
    if "remat" in result:
        rows = result["remat"]
        lines += [
            "",
            f"## remat: {rows[0]['shape']} (gradient of a sum of squares)",
            "",
            "| remat | activations kept for the backward pass (MB) | vs none | XLA temporary memory (MB) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['remat']} | {r['kept_activation_bytes'] / 1e6:.1f} | {r['kept_vs_none']:.3f} | {r['temp_bytes'] / 1e6:.1f} |"
            for r in rows
        ]
    if "gelu" in result:
        g = result["gelu"]
        lines += ["", f"## gelu: fc1-GELU-fc2 forward + backward, {g['shape']}", "", *_timing_table(g)]
        lines += ["", f"Largest difference of the two GELUs on 4 x N(0, 1) inputs: {g['max_abs_difference']:.2e}."]
    if "attention" in result:
        lines += ["", "## attention: the core's forward + backward, `[B, T, heads, kv]`"]
        for row in result["attention"]:
            lines += ["", f"{row['where']}, {row['shape']}:", "", *_timing_table(row)]
            lines += ["", f"Largest difference of the two outputs: {row['max_abs_difference']:.2e}."]
    if "depthwise" in result:
        d = result["depthwise"]
        lines += ["", f"## depthwise: forward + backward, {d['shape']}", "", *_timing_table(d)]
        lines += [
            "",
            f"XLA's FLOP count of its grouped convolution's gradient: {d['xla_grouped_gradient_flops_per_image'] / 1e9:.2f} "
            f"GFLOPs per image; the convolution itself is {d['ours_direct_macs_per_image'] / 1e9:.4f} GMACs per image. "
            f"Largest difference of the two whole-grid outputs: {d['max_abs_difference']:.2e}.",
        ]
    if "normalize" in result:
        n = result["normalize"]
        lines += ["", f"## normalize: {n['shape']} to float32", "", *_timing_table(n)]
    if "sha256" in result:
        s = result["sha256"]
        lines += ["", f"## sha256: {s['gb_per_cpu_second']:.2f} GB per CPU second ({s['bytes'] >> 20} MiB buffer)"]
    lines += [
        "",
        f"Machine: {meta['cpu']}, cores allowed {meta['cores_allowed']}; jax {meta['jax']}, numpy {meta['numpy']}; "
        f"XLA_FLAGS `{meta['xla_flags']}`. Command: `{meta['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one round: checks the script runs")
    parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    rounds = 1 if args.smoke else args.rounds
    use_one_thread()
    result = run(sections, args.smoke, rounds)
    meta = {
        "rounds": rounds,
        "cpu": platform.processor() or platform.machine(),
        "cores_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "command": "python benchmarks/design_choices.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = markdown(result, meta)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"result": result, "meta": meta}, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
