"""Train-step speed, memory and model FLOPs utilisation of mae, partial and prmim, side by side.

    python benchmarks/step_time.py --variant B/16 --dtype bfloat16 --batch 256 --out /tmp/step_time
    python benchmarks/step_time.py --variant Ti/4 --image_size 32 --decoder_depth 1 --batch 4 --steps 2  # CPU smoke

For each method the whole train step (forward, backward, AdamW) is compiled on
synthetic data and timed over ``--steps`` steps after two warm-up steps; the
methods are timed in interleaved rounds so machine noise hits all of them alike.
Reported per method: images/s, step time relative to MAE, model FLOPs per
step (XLA's count of the step as traced), MFU = achieved model FLOP/s over the card's dense peak (bf16 or fp32 by
``--dtype``) where the card is known, and the compiled program's memory.

This module is also the library of ``benchmarks/device_check.py`` (the GPU
device check) and ``benchmarks/ablation_fmnist.py``: ``prepare`` is the one
place that builds a train step through the training API, ``time_interleaved``
times programs side by side and ``allocator_peaks`` reads each program's
allocator peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import flax.linen as nn
import jax
import numpy as np

from prmim_jax import masking, methods, optim, runs, throughput, train_step
from prmim_jax.methods import mae as mae_family
from prmim_jax.models import mae as mae_lib


def prepare(
    model_config,
    method_name: str,
    throw_ratio: float,
    batch: int,
    seed: int = 0,
    *,
    materialize: bool = True,
    compiler_options: dict | None = None,
) -> dict:
    """One method's train step, compiled for ``batch`` images of ``model_config``'s shape.

    ``lower`` then ``compile_step``; see ``lower`` for the step and the keys. Adds:
      ``compiled``, ``compiled_bytes``, ``compile_seconds``: ``compile_step``'s.
      ``flops``: XLA's count of the compiled step on this backend (None where it gives none).
      ``state``, ``data``: ``init()``'s result, unless ``materialize`` is False (then
        nothing is placed on the device).
    """
    program = lower(model_config, method_name, throw_ratio, batch, seed)
    if program["model_flops"] is None:
        program["model_flops"] = program["cpu_model_flops"]()
    program.update(compile_step(program, compiler_options))
    program["flops"] = throughput.flops(program["compiled"].cost_analysis())
    if materialize:
        program["state"], program["data"] = program["init"]()
    return program


def lower(model_config, method_name: str, throw_ratio: float, batch: int, seed: int = 0) -> dict:
    """One method's train step for ``batch`` images of ``model_config``'s shape, traced and lowered, not compiled.

    The only function of the benchmarks that builds a step through the training API
    (``methods``, ``optim``, ``train_step``), so a change of that API is ported here.
    The step is ``(state, data, rng) -> (state, metrics)`` with the state donated.

    Returns a dict:
      ``lowered``: the traced step, which ``compile_step`` compiles (under any XLA options).
      ``init``: ``() -> (state, data)``, a fresh train state and batch on the
        default device (images ``[B, H, W, C] float32`` standard normal, token
        ids from the method's sampler on per-image noise, as the data pipeline
        makes them).
      ``model_flops``: FLOPs per step, XLA's count of the step as traced (before
        XLA's optimisations, so the same on every backend): what MFU divides. None
        where the backend gives no count (a GPU): ``cpu_model_flops()`` counts it then.
    """
    tx = optim.build_optimizer(optim.optimizer_config(), global_batch=batch, total_steps=1000)

    def build(model_config):
        method = mae_family.from_sections(model_config, methods.method_config(method_name, throw_ratio=throw_ratio))
        init_state = jax.jit(lambda key: nn.unbox(runs.init_state(method, tx, key, batch)))
        step = jax.jit(functools.partial(train_step.train_step, method=method), donate_argnums=0)
        return method, init_state, step

    method, init_state, step = build(model_config)
    image_shape = (batch, *method.model.image_size, method.model.channels)
    rng = np.random.default_rng(seed)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(batch)]))
    host_data = {
        "images": rng.normal(size=image_shape).astype(np.float32),
        "ids_visible": ids.visible,
        "ids_decoded": ids.decoded,
        "ids_thrown": ids.thrown,
    }
    abstract_data = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_data)
    abstract_state = jax.eval_shape(init_state, jax.random.key(seed))
    lowered = step.lower(abstract_state, abstract_data, jax.random.key(0))

    def cpu_model_flops() -> float | None:
        # On a GPU (PJRT's C API) XLA counts no traced program (jax 0.11.2, H200). The model FLOPs are no
        # more the backend's business than the step is: count the same step lowered for the host's CPU, with
        # XLA's attention (cuDNN's has no CPU lowering), where XLA does count.
        with_xla_attention = model_config.copy_and_resolve_references()
        with_xla_attention.attention_impl = "xla"
        _, _, on_cpu = build(with_xla_attention)
        with jax.default_device(jax.devices("cpu")[0]):
            return throughput.flops(on_cpu.lower(abstract_state, abstract_data, jax.random.key(0)).cost_analysis())

    def init():
        return init_state(jax.random.key(seed)), jax.device_put(host_data)

    return {
        "method": method_name,
        "rho_d": throw_ratio,
        "batch": batch,
        "lowered": lowered,
        "init": init,
        "model_flops": throughput.flops(lowered.cost_analysis()),
        "cpu_model_flops": cpu_model_flops,
    }


def compile_step(program: dict, compiler_options: dict | None = None) -> dict:
    """``{'compiled', 'compiled_bytes', 'compile_seconds'}`` of ``program``'s step under XLA ``compiler_options``.

    ``compiler_options`` maps DebugOptions fields to values (``{'xla_gpu_enable_triton_gemm': False}``),
    as ``XLA_FLAGS`` would set them for the whole process.
    """
    start = time.perf_counter()
    compiled = program["lowered"].compile(compiler_options) if compiler_options else program["lowered"].compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    footprint = (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"compiled": compiled, "compiled_bytes": int(footprint), "compile_seconds": seconds}


def run_steps(compiled, state, data, steps: int):
    """Runs ``steps`` steps and waits for them; returns ``(state, seconds per step)``."""
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data, jax.random.key(0))
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / steps


def time_interleaved(
    entries: list[dict], steps: int, rounds: int, warmup: int = 2, deadline: float | None = None
) -> list[float]:
    """Median seconds per step of each entry, timed in interleaved rounds.

    Each entry holds ``compiled``, ``state`` and ``data``; its ``state`` is replaced
    by the state after the last step (the step donates it). Every round times
    ``steps`` steps of every entry in turn, so machine noise hits all alike. With a
    ``deadline`` (``time.time()``), no round starts that would end after it; one always runs.
    """
    for entry in entries:
        entry["state"], _ = run_steps(entry["compiled"], entry["state"], entry["data"], warmup)
    seconds = [[] for _ in entries]
    for _ in range(rounds):
        started = time.time()
        for entry, times in zip(entries, seconds, strict=True):
            entry["state"], step_seconds = run_steps(entry["compiled"], entry["state"], entry["data"], steps)
            times.append(step_seconds)
        if deadline is not None and 2 * time.time() - started > deadline:
            break
    return [float(np.median(times)) for times in seconds]


def allocator_peaks(programs: list[dict], warmup: int = 2, memory_stats=None) -> list[int | None]:
    """Each program's peak device memory as the allocator saw it (``peak_bytes_in_use``); None without one.

    The allocator's peak is a process-wide high-water mark with no reset (jax
    0.10 and 0.11), so the programs run one at a time, alone on the device, in
    ascending order of their compiled footprint, each from a fresh state that is
    freed before the next: a program's reading is its own peak when it raised
    the mark. When it did not (its peak stayed under an earlier one, or under
    what compilation left), its reading is only an upper bound and the entry is
    returned negative (``-bound``). Call this before any program's state exists.
    ``memory_stats``: ``() -> dict | None``, by default the first device's.
    """
    memory_stats = memory_stats or jax.devices()[0].memory_stats
    stats = memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return [None] * len(programs)
    peaks: list[int | None] = [None] * len(programs)
    mark = stats["peak_bytes_in_use"]
    for i in sorted(range(len(programs)), key=lambda i: programs[i]["compiled_bytes"]):
        state, data = programs[i]["init"]()
        state, _ = run_steps(programs[i]["compiled"], state, data, warmup)
        del state, data
        peak = memory_stats()["peak_bytes_in_use"]
        peaks[i] = peak if peak > mark else -peak
        mark = max(mark, peak)
    return peaks


def run(args) -> tuple[list[dict], dict]:
    model_config = mae_lib.model_config(
        args.variant,
        image_size=args.image_size,
        dtype=args.dtype,
        decoder_width=args.decoder_width,
        decoder_depth=args.decoder_depth,
    )
    plans = [("mae", 0.0), ("partial", args.throw_ratio), ("prmim", args.throw_ratio)]
    programs = [prepare(model_config, name, rho, args.batch) for name, rho in plans]
    seconds = time_interleaved(programs, args.steps, args.rounds)
    device = jax.devices()[0]
    peak = throughput.peak_flops(device.device_kind, args.dtype)
    results = [
        {
            "method": program["method"],
            "rho_d": program["rho_d"],
            "batch": args.batch,
            "images_per_second": args.batch / step_seconds,
            "step_seconds": step_seconds,
            "step_time_vs_mae": step_seconds / seconds[0],
            "flops_per_step": program["model_flops"],
            "mfu": program["model_flops"] / step_seconds / peak if peak else None,
            "compiled_memory_bytes": program["compiled_bytes"],
        }
        for program, step_seconds in zip(programs, seconds, strict=True)
    ]
    meta = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "variant": args.variant,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "peak_flops": peak,
    }
    return results, meta


def markdown(results, meta) -> str:
    lines = [
        f"Train step, ViT-{meta['variant']} at {meta['image_size']}px, {meta['dtype']}, "
        f"on {meta['device']} ({meta['backend']}).",
        "",
        "| method | rho_d | batch | images/s | step time / MAE | TFLOPs per step | MFU | compiled memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['rho_d']} | {r['batch']} | {r['images_per_second']:,.0f} | "
            f"{r['step_time_vs_mae']:.3f} | {r['flops_per_step'] / 1e12:.3f} | {mfu} | "
            f"{r['compiled_memory_bytes'] / 2**30:.2f} |"
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
