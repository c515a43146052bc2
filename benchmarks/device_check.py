"""The GPU device check: the train-step tables of the README, measured in one command on a bare GPU machine.

    bash benchmarks/device_check.sh OUT            # on the GPU machine: under 8 minutes on an H100
    bash benchmarks/device_check.sh --smoke OUT    # the same code on the CPU with tiny shapes (CI)

``device_check.sh`` picks the interpreter and installs carried wheels; this
program runs the phases, each in its own process so that each starts with an
empty device and the allocator's high-water mark at zero, and writes
``OUT/device_check.md`` (the tables), ``OUT/device_check.json`` (every number)
and ``OUT/device_check.log`` (every phase's output). The phases, in order of
priority:

1. ``vit_b``: ViT-B/16 at 224, bfloat16, the train step (forward, backward,
   AdamW) of MAE, partial and PR-MIM at rho_d 0.25 / 0.5 / 0.65 with furthest
   sampling, one batch size that fills the card: images/s, step time relative
   to MAE (interleaved rounds), peak device memory relative to MAE (the
   allocator's peak, ``step_time.allocator_peaks``; XLA's compiled footprint
   where the backend has no allocator statistics, as on the CPU), MFU against
   the card's dense bf16 peak and against a measured bf16 matrix product.
2. ``torch``: the same MAE step in PyTorch (``benchmarks/torch_mae.py``:
   transformers' ``ViTMAEForPreTraining``, bf16 autocast, SDPA, ``torch.compile``,
   fused AdamW) at the same batch, and our MAE's images/s over its.
3. ``vit_l``: ViT-L/16, MAE, PR-MIM and partial at rho_d 0.5.
4. ``flags``: the ViT-B MAE step compiled with XLA options one at a time (and
   the launcher's set, ``launch/lib.sh``), timed in interleaved rounds against
   the defaults: the measurement behind the launcher's ``XLA_FLAGS``.

A global time guard (``--budget`` seconds) gives each phase a deadline that
leaves the later phases their reserve; a phase stops compiling when the next
program would not finish in time, times what it compiled, and a phase that
overruns is stopped with what it wrote kept. The tables are rewritten after
every phase, so an interrupted check still leaves what it measured.

The batch that fills the card is arithmetic: XLA CPU's compiled ViT-B MAE step
in float32 needs 212 MB of temporaries per image (``benchmarks/results/cost_cpu.md``,
13.5 GB at batch 64), about half of that in bfloat16 (110 MB; ViT-L 160 MB);
four fifths of the memory JAX takes (90% of the card) leaves 57 GB on an 80 GB
H100: batch 512 for ViT-B, 256 for ViT-L (powers of two, at most 512). The
compiled MAE step's footprint is checked before anything runs, and the batch is
halved while it does not fit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PHASES = ("vit_b", "torch", "vit_l", "flags")

# Model shapes in benchmarks/torch_mae.py's keys; the decoder is MAE's (512 wide, 8 deep, 16 heads).
MAE_DECODER = dict(decoder_width=512, decoder_depth=8, decoder_heads=16)
VIT_B16 = dict(variant="B/16", image_size=224, patch_size=16, width=768, depth=12, heads=12, **MAE_DECODER)
VIT_L16 = dict(variant="L/16", image_size=224, patch_size=16, width=1024, depth=24, heads=16, **MAE_DECODER)
# The smoke run's one tiny shape for every phase: an 8 x 8 token grid (the 7 x 7 aggregation fits), one
# block each. ViT-L's phase uses it too, so its programs come from the compilation cache on a 2-core CI.
SMOKE_SHAPE = dict(
    variant="Ti/4",
    image_size=32,
    patch_size=4,
    width=32,
    depth=1,
    heads=2,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
)
# Priority order (what an interrupted phase measured first matters most): MAE, then rho_d 0.5, 0.25, 0.65.
VIT_B_PLANS = [("mae", 0.0)] + [(name, rho) for rho in (0.5, 0.25, 0.65) for name in ("prmim", "partial")]
VIT_L_PLANS = [("mae", 0.0), ("prmim", 0.5), ("partial", 0.5)]
# Bytes per image of the bfloat16 train step's temporaries (module docstring) and the most a batch may be.
PER_IMAGE_BYTES = {"B/16": 110e6, "L/16": 160e6}
MAX_BATCH = 512

# The XLA options measured against the defaults, one at a time. 'xla' are DebugOptions fields (what
# XLA_FLAGS sets), 'jax' are jax.config options, 'model' overrides the model config (not a flag).
# XLA's GPU defaults (xla/debug_options_flags.cc): the scheduler off, Triton GEMMs and command buffers
# on; an option the installed XLA no longer has fails its own row, not the phase.
FLAG_VARIANTS = [
    dict(name="latency_hiding_scheduler", xla={"xla_gpu_enable_latency_hiding_scheduler": True}),
    dict(name="optimization_level_O1", jax={"jax_optimization_level": "O1"}),
    dict(name="no_triton_gemm", xla={"xla_gpu_enable_triton_gemm": False}),
    dict(name="no_command_buffer", xla={"xla_gpu_enable_command_buffer": ""}),
    # 'auto' attention is cuDNN wherever jax's kernel takes the shapes: this row is what that buys.
    dict(name="xla_attention", model={"attention_impl": "xla"}, gpu_only=True),
]

# Seconds kept for the later phases when an earlier one runs (GPU; a smoke run reserves nothing).
RESERVE_SECONDS = {"torch": 100, "vit_l": 90, "flags": 50}
# A phase that would start with less than this is skipped.
MIN_SECONDS = {"vit_b": 60, "torch": 40, "vit_l": 50, "flags": 40}
# Seconds a phase may overrun its deadline (a compilation in flight) before it is stopped; a smoke run's
# deadlines only stop compiling (CI's CPU is slow and shared, and a smoke run must not lose its tables).
GRACE_SECONDS = {"gpu": 20, "smoke": 300}


# ---------------------------------------------------------------------------------------------------------------
# The launcher's flags and carried wheels (no JAX needed)


def launcher_xla_flags() -> dict:
    """The XLA flags ``launch/lib.sh`` sets on GPU, as ``{DebugOptions field: value}``."""
    flags = subprocess.run(
        ["bash", "-c", f"source {REPO / 'launch' / 'lib.sh'}; xla_gpu_flags"],
        capture_output=True,
        text=True,
        check=True,
        env={key: value for key, value in os.environ.items() if key != "PRMIM_XLA_GPU_FLAGS"},
    ).stdout.split()
    return dict(parse_flag(flag) for flag in flags)


def parse_flag(flag: str) -> tuple[str, object]:
    """``'--xla_x=true'`` -> ``('xla_x', True)``: the typed value a compile option needs."""
    name, _, value = flag.removeprefix("--").partition("=")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    if value.lstrip("-").isdigit():
        return name, int(value)
    return name, value.strip("'\"")


def missing_wheels(wheel_dir: pathlib.Path) -> list[pathlib.Path]:
    """The wheels in ``wheel_dir`` whose distribution this interpreter does not have installed."""
    missing = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        distribution = wheel.name.split("-")[0]
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    return missing


# ---------------------------------------------------------------------------------------------------------------
# Phases (each runs in its own process)


def model_config(shape: dict, **overrides):
    """The bfloat16 model section for ``shape`` (keys of ``VIT_B16``), with ``overrides`` (``attention_impl``)."""
    from prmim_jax.models import mae as mae_lib

    return mae_lib.model_config(
        shape["variant"],
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        width=shape["width"],
        depth=shape["depth"],
        num_heads=shape["heads"],
        decoder_width=shape["decoder_width"],
        decoder_depth=shape["decoder_depth"],
        decoder_num_heads=shape["decoder_heads"],
        dtype="bfloat16",
        **overrides,
    )


def versions() -> dict:
    """Python's and the packages' versions this interpreter has (None: not installed)."""
    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def choose_batch(shape: dict, pool_bytes: int | None, smoke: bool) -> int:
    """The largest power of two <= MAX_BATCH whose temporaries fit four fifths of the memory pool.

    2 in a smoke run; 256 where the backend reports no pool.
    """
    if smoke:
        return 2
    if not pool_bytes:
        return 256
    fitting = 0.8 * pool_bytes / PER_IMAGE_BYTES.get(shape["variant"], PER_IMAGE_BYTES["L/16"])
    batch = 1
    while batch * 2 <= min(fitting, MAX_BATCH):
        batch *= 2
    return batch


def matmul_ceiling(size: int, repeats: int) -> float:
    """FLOP/s of a ``size`` x ``size`` bfloat16 matrix product on random data (the card's practical peak)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16) for i in (1, 2))
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        c = product(a, b)
    c.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class Deadline:
    """An absolute ``time.time()`` deadline, and what the phase learned of its lowering and compile times."""

    def __init__(self, at: float, after_compiles: float):
        self.at = at
        self.after_compiles = after_compiles  # seconds kept for memory and timing once compiling stops
        self.longest_lowering = 0.0
        self.longest_compile = 0.0

    def can_start(self, compiling: int, threads: int) -> bool:
        """Whether one more program, lowered here and then compiled behind the ``compiling`` ones already queued
        on ``threads`` threads, would still be compiled in time to leave the timing its time."""
        queued_rounds = compiling // threads + 1
        finish = time.time() + self.longest_lowering + queued_rounds * self.longest_compile
        return self.at - finish > self.after_compiles

    def seconds_left_to_compile(self) -> float:
        return max(0.0, self.at - self.after_compiles - time.time())


def compile_threads(jobs: int) -> int:
    """Compilations run at once: XLA's GPU compiler keeps about four cores busy (LLVM, ptxas), so a quarter of
    the host's cores, at least one and at most one per job."""
    return max(1, min(jobs, (os.cpu_count() or 1) // 4))


class OutOfMemory(Exception):
    """The batch does not fit the device's memory pool."""


def jax_phase(spec: dict, result_path: pathlib.Path, deadline: Deadline) -> None:
    """Compiles, measures memory and times the programs of ``spec`` (phases vit_b, vit_l, flags).

    Writes ``result_path`` (JSON) after every step, so a phase stopped at its
    deadline leaves what it measured: ``rows`` (one per method, rho_d and
    variant, with ``status``), ``batch``, the device and versions, ``notes``.
    """
    import jax

    sys.path.insert(0, str(BENCHMARKS))
    import step_time

    from prmim_jax import throughput

    if not spec["smoke"] and jax.default_backend() == "cpu":
        raise SystemExit("JAX sees no accelerator; the CPU dry run is: bash benchmarks/device_check.sh --smoke OUT")
    device = jax.devices()[0]
    pool = (device.memory_stats() or {}).get("bytes_limit")
    result = {
        "label": spec["label"],
        "smoke": spec["smoke"],
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "pool_bytes": pool,
        "batch": spec.get("batch") or choose_batch(spec["shape"], pool, spec["smoke"]),
        "peak_flops_bf16": throughput.peak_flops(device.device_kind, "bfloat16"),
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": [],
        "notes": [],
    }

    def save():  # whole or not at all: the driver may stop this process at any moment
        partial = result_path.with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=1) + "\n")
        partial.replace(result_path)

    if spec.get("matmul"):
        size, repeats = (256, 3) if spec["smoke"] else (8192, 20)
        result["matmul_flops"] = matmul_ceiling(size, repeats)
    save()

    jobs = [(plan, variant) for plan in spec["plans"] for variant in [dict(name="defaults"), *spec.get("flags", [])]]
    while True:
        try:
            programs = compile_programs(step_time, spec["shape"], jobs, result, pool, deadline, save)
            break
        except OutOfMemory as error:
            result["notes"].append(str(error))
            result["batch"] //= 2
            result["rows"] = []
    if not programs:
        raise SystemExit("no program compiled")
    if spec.get("memory", True):
        peaks = step_time.allocator_peaks([program for _, program in programs])
        for (row, _), peak in zip(programs, peaks, strict=True):
            row["allocator_peak_bytes"] = abs(peak) if peak is not None else None
            row["allocator_peak_is_bound"] = peak is not None and peak < 0
        save()

    entries = [program for _, program in programs]
    for program in entries:
        program["state"], program["data"] = program["init"]()
    seconds = step_time.time_interleaved(entries, spec["steps"], spec["rounds"], deadline=deadline.at)
    for (row, _), step_seconds in zip(programs, seconds, strict=True):
        row.update(status="ok", step_seconds=step_seconds, images_per_second=result["batch"] / step_seconds)
    save()
    # Where the backend counted no traced step (a GPU), the count on the CPU comes last: MFU matters less
    # than images/s, and each count traces the step once more.
    for row, program in programs:
        if row.get("model_flops") is None and spec.get("mfu", True):
            row["model_flops"] = program["cpu_model_flops"]()
            save()


def compile_programs(step_time, shape, jobs, result, pool, deadline, save) -> list[tuple[dict, dict]]:
    """``(row, program)`` of each job ``((method, rho_d), variant)`` compiled in time at ``result['batch']``.

    Jobs are lowered one after another in this thread (tracing holds the GIL) and
    each is compiled in a thread pool as soon as it is lowered, so compiling
    overlaps lowering and other compilations: a ViT-B step took 30-43 s to
    compile on an H200, which the phases could not afford one after another. A job
    whose ``jax`` options XLA reads at compile time compiles in this thread, under
    them. A job that fails keeps its row with the error as status; one still
    compiling at the deadline is left to its thread (``jax_phase``'s process exits
    without joining it). Raises ``OutOfMemory`` when the first program (MAE, the
    largest) and the states of all the others would not fit the memory ``pool``
    together, as they must while they are timed.
    """
    import concurrent.futures

    import jax

    batch = result["batch"]
    threads = compile_threads(len(jobs))
    executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="compile")
    queued = []
    for (method, rho_d), variant in jobs:
        for _, _, future in queued:  # what the finished compilations took sizes the next start
            if future.done() and not future.exception():
                deadline.longest_compile = max(deadline.longest_compile, future.result()["compile_seconds"])
        compiling = sum(not future.done() for _, _, future in queued)
        if queued and not deadline.can_start(compiling, threads):
            result["notes"].append(f"out of time: started {len(queued)} of {len(jobs)} programs")
            break
        row = {"method": method, "rho_d": rho_d, "batch": batch, "variant": variant["name"]}
        row.update({key: variant[key] for key in ("xla", "jax", "model", "launcher") if key in variant})
        result["rows"].append(row)
        if variant.get("gpu_only") and jax.default_backend() != "gpu":
            row["status"] = "skipped: GPU only"
            continue
        started = time.time()
        try:
            program, future = lower_variant(step_time, shape, (method, rho_d), batch, variant, executor)
        except Exception as error:  # an option this XLA lacks, an attention kernel this card lacks, ...
            fail(row, error, save)
            continue
        deadline.longest_lowering = max(deadline.longest_lowering, time.time() - started)
        row["status"] = "compiling"
        queued.append((row, program, future))
        save()

    programs = []
    for row, program, future in queued:
        try:
            # The first program (MAE, what every ratio divides by) is waited for whatever the time.
            program.update(future.result(timeout=deadline.seconds_left_to_compile() if programs else None))
        except concurrent.futures.TimeoutError:
            row["status"] = "out of time: still compiling at the deadline"
            save()
            continue
        except Exception as error:
            fail(row, error, save)
            continue
        deadline.longest_compile = max(deadline.longest_compile, program["compile_seconds"])
        row.update(
            status="compiled",
            compile_seconds=program["compile_seconds"],
            model_flops=program["model_flops"],
            compiled_bytes=program["compiled_bytes"],
        )
        state_bytes = program["compiled"].memory_analysis().argument_size_in_bytes
        needed = program["compiled_bytes"] + (len(jobs) - 1) * state_bytes
        if not programs and pool and batch > 1 and needed > 0.95 * pool:
            executor.shutdown(wait=False, cancel_futures=True)
            raise OutOfMemory(
                f"batch {batch}: the compiled {row['method']} step ({program['compiled_bytes'] / 2**30:.1f} GiB) "
                f"beside {len(jobs) - 1} more states ({state_bytes / 2**30:.1f} GiB each) exceeds 95% of the "
                f"{pool / 2**30:.1f} GiB pool; halved"
            )
        programs.append((row, program))
        save()
    executor.shutdown(wait=False, cancel_futures=True)
    return programs


def fail(row: dict, error: Exception, save) -> None:
    """Records ``error`` as ``row``'s status (its traceback goes to device_check.log)."""
    traceback.print_exception(error)
    row["status"] = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
    save()


def lower_variant(step_time, shape: dict, plan: tuple, batch: int, variant: dict, executor):
    """``(program, future of its compile_step)`` for one (method, rho_d) under one variant's XLA, jax or model
    options (``step_time.lower``, then ``step_time.compile_step`` on ``executor``, or here for ``jax`` options)."""
    import concurrent.futures

    import jax

    previous = {name: getattr(jax.config, name) for name in variant.get("jax", {})}
    for name, value in variant.get("jax", {}).items():
        jax.config.update(name, value)
    try:
        program = step_time.lower(model_config(shape, **variant.get("model", {})), plan[0], plan[1], batch)
        options = variant.get("xla") or None
        if not previous:
            return program, executor.submit(step_time.compile_step, program, options)
        future = concurrent.futures.Future()
        future.set_result(step_time.compile_step(program, options))
        return program, future
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)


# ---------------------------------------------------------------------------------------------------------------
# The driver


def phase_spec(name: str, smoke: bool, vit_b: dict | None) -> dict:
    """What phase ``name`` runs; the torch and flags phases take the batch ViT-B's phase chose (``vit_b``)."""
    batch = (vit_b or {}).get("batch")
    shape = SMOKE_SHAPE if smoke else VIT_B16
    steps, rounds = (1, 1) if smoke else (10, 3)
    after_compiles = 5 if smoke else 40  # seconds for the memory readings and the timed rounds
    common = dict(smoke=smoke, steps=steps, rounds=rounds, after_compiles=after_compiles)
    if name == "vit_b":
        return dict(common, label="ViT-B/16", shape=shape, plans=VIT_B_PLANS, matmul=True)
    if name == "vit_l":
        return dict(common, label="ViT-L/16", shape=SMOKE_SHAPE if smoke else VIT_L16, plans=VIT_L_PLANS)
    if name == "flags":
        launcher = launcher_xla_flags()
        flags = [dict(variant, launcher=set_by(variant, launcher)) for variant in FLAG_VARIANTS]
        if launcher and not any(variant.get("xla") == launcher for variant in flags):
            flags.insert(0, dict(name="launcher", xla=launcher, launcher=True))
        # More rounds: a flag's effect is a few percent, the size of the noise of three.
        common["rounds"] = rounds if smoke else 5
        return dict(
            common,
            label="ViT-B/16 MAE",
            shape=shape,
            plans=[("mae", 0.0)],
            flags=flags,
            batch=batch,
            memory=False,
            mfu=False,
        )
    if name == "torch":
        torch_shape = {key: value for key, value in shape.items() if key != "variant"}
        return dict(common, shape=torch_shape, batch=batch or (2 if smoke else 256))
    raise ValueError(name)


def set_by(variant: dict, launcher: dict) -> bool:
    """Whether the launcher's XLA flags include every XLA option of ``variant`` (and it has some)."""
    options = variant.get("xla", {})
    return bool(options) and all(name in launcher and launcher[name] == value for name, value in options.items())


def run_phase(name: str, spec: dict, deadline: float, work: pathlib.Path, log, env: dict) -> tuple[dict | None, str]:
    """Runs one phase in its own process until ``deadline`` (+ grace); ``(its result or None, status)``."""
    result_path = work / f"{name}.json"
    if name == "torch":
        command = [sys.executable, str(BENCHMARKS / "torch_mae.py"), "--shape", json.dumps(spec["shape"])]
        command += ["--batch", str(spec["batch"]), "--steps", str(spec["steps"]), "--rounds", str(spec["rounds"])]
        command += ["--out", str(result_path)] + (["--smoke"] if spec["smoke"] else [])
    else:
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--phase", name]
        command += ["--spec", json.dumps(spec), "--result", str(result_path), "--deadline", str(deadline)]
    log.write(f"\n=== phase {name}: {' '.join(command)}\n")
    log.flush()
    # Its own process group, so that a phase that overruns goes with every process it started.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        grace = GRACE_SECONDS["smoke" if spec["smoke"] else "gpu"]
        returncode = process.wait(timeout=max(1.0, deadline - time.time() + grace))
        status = "ok" if returncode == 0 else f"failed (exit status {returncode}; see device_check.log)"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "stopped at its deadline; what it measured before is kept"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return result, status


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value else "n/a"


def _ratio(value, reference) -> str:
    return f"{value / reference:.3f}" if value and reference else "n/a"


def memory_of(row: dict) -> tuple[int | None, str]:
    """A row's peak memory and how it was measured: the allocator's peak, else XLA's compiled footprint."""
    if row.get("allocator_peak_bytes"):
        return row["allocator_peak_bytes"], "<=" if row.get("allocator_peak_is_bound") else ""
    return row.get("compiled_bytes"), ""


def jax_table(result: dict) -> list[str]:
    """Rows of a ViT phase: one line per (method, rho_d), ratios to the phase's MAE row."""
    rows = [row for row in result["rows"] if row["variant"] == "defaults"]
    mae = next((row for row in rows if row["method"] == "mae"), {})
    mae_memory, _ = memory_of(mae)
    allocator = any(row.get("allocator_peak_bytes") for row in rows)
    peak, matmul = result.get("peak_flops_bf16"), result.get("matmul_flops")
    lines = [
        f"{result['label']} train step (forward, backward, AdamW), bfloat16, batch {result['batch']}, furthest "
        f"sampling; {result['device']} ({result['backend']}). Memory: "
        + (
            "the allocator's peak (`peak_bytes_in_use`) of each program run alone; '<=' marks an upper bound."
            if allocator
            else "XLA's compiled footprint (`memory_analysis()`: arguments + temporaries + outputs - donated)."
        )
        + " MFU: model FLOPs (XLA's count of the traced step) per second over the card's dense bf16 peak"
        + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else " (unknown card: n/a)")
        + (f" and over a measured bf16 matrix product ({matmul / 1e12:.3g} TFLOP/s)." if matmul else "."),
        "",
        "| method | rho_d | images/s | step time / MAE | peak memory GiB | memory / MAE | MFU | MFU of matmul "
        "| TFLOPs per step | compile s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["method"] != "mae", r["rho_d"], r["method"])):
        memory, bound = memory_of(row)
        step = row.get("step_seconds")
        achieved = row["model_flops"] / step if step and row.get("model_flops") else None
        lines.append(
            f"| {row['method']} | {row['rho_d']:g} | {row.get('images_per_second', 0):,.0f} | "
            f"{_ratio(step, mae.get('step_seconds'))} | {bound}{_gib(memory)} | {bound}{_ratio(memory, mae_memory)} | "
            f"{f'{achieved / peak:.1%}' if achieved and peak else 'n/a'} | "
            f"{f'{achieved / matmul:.1%}' if achieved and matmul else 'n/a'} | "
            f"{(row.get('model_flops') or 0) / 1e12:.3f} | {row.get('compile_seconds', 0):.1f} | {row['status']} |"
        )
    return lines + [f"- {note}" for note in result.get("notes", [])]


def torch_table(torch_result: dict, vit_b: dict | None) -> list[str]:
    ours = next((r for r in (vit_b or {}).get("rows", []) if r["method"] == "mae" and r["variant"] == "defaults"), {})
    ours_speed = ours.get("images_per_second") if ours.get("batch") == torch_result["batch"] else None
    return [
        f"The MAE step in PyTorch {torch_result['torch']} with transformers {torch_result['transformers']} on "
        f"{torch_result['device']}: `ViTMAEForPreTraining`, bf16 autocast, SDPA attention, "
        f"`torch.compile` ({torch_result['compile_backend']}), fused AdamW; masking noise drawn on the device. "
        "Ours: the MAE row of ViT-B/16 above (its own process, same card, same batch).",
        "",
        "| step | batch | images/s | ours / PyTorch | first step s (compile) | graph breaks | peak memory GiB |",
        "|---|---|---|---|---|---|---|",
        f"| PyTorch, transformers ViTMAEForPreTraining | {torch_result['batch']} | "
        f"{torch_result['images_per_second']:,.0f} | 1 | {torch_result['first_step_seconds']:.1f} | "
        f"{torch_result['graph_breaks']} | {_gib(torch_result.get('peak_memory_bytes'))} |",
        f"| ours, MAE (JAX) | {ours.get('batch', 'n/a')} | {ours.get('images_per_second', 0):,.0f} | "
        f"{_ratio(ours_speed, torch_result['images_per_second'])} | {ours.get('compile_seconds', 0):.1f} | - | "
        f"{_gib(memory_of(ours)[0])} |",
    ]


def flags_table(result: dict) -> list[str]:
    rows = result["rows"]
    defaults = next((row for row in rows if row["variant"] == "defaults"), {})
    lines = [
        f"XLA options, one at a time, on the ViT-B/16 MAE step (batch {result['batch']}, {result['device']}), timed in "
        "interleaved rounds against the same step with XLA's defaults; below 1 is faster. 'launcher' says whether "
        "`launch/lib.sh` sets it on GPU.",
        "",
        "| variant | options | launcher | step time / defaults | images/s | compile s | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        options = {**row.get("xla", {}), **row.get("jax", {}), **row.get("model", {})}
        shown = " ".join(f"{key}={value!r}" for key, value in options.items()) or "-"
        lines.append(
            f"| {row['variant']} | `{shown}` | {'yes' if row.get('launcher') else 'no'} | "
            f"{_ratio(row.get('step_seconds'), defaults.get('step_seconds'))} | "
            f"{row.get('images_per_second', 0):,.0f} | {row.get('compile_seconds', 0):.1f} | {row['status']} |"
        )
    return lines + [f"- {note}" for note in result.get("notes", [])]


TITLES = {
    "vit_b": "(a) ViT-B/16: MAE, partial and PR-MIM",
    "torch": "(b) The same MAE step in PyTorch",
    "vit_l": "(c) ViT-L/16 at rho_d 0.5",
    "flags": "(d) XLA flags, A/B",
}


def report(run: dict) -> str:
    """The markdown of every table measured so far, with what was not measured and why."""
    meta = run["meta"]
    lines = [
        "# Device check",
        "",
        f"`{meta['command']}` on {meta['host']}, {meta['date']}; versions {json.dumps(meta['versions'])}; "
        f"`XLA_FLAGS={meta['xla_flags']}`; budget {meta['budget_seconds']:.0f} s, "
        f"took {meta.get('seconds', 0):.0f} s.",
    ]
    if meta["smoke"]:
        lines += ["", "Smoke run: tiny shapes on the CPU. The numbers check that the code runs, not the card."]
    for name in run["phases_requested"]:
        phase = run["phases"].get(name, {"status": "not started"})
        lines += ["", f"## {TITLES[name]}", "", f"Phase `{name}`: {phase['status']}, {phase.get('seconds', 0):.0f} s."]
        result = phase.get("result")
        if not result:
            continue
        lines.append("")
        if name == "torch":
            lines += torch_table(result, (run["phases"].get("vit_b") or {}).get("result"))
        elif name == "flags":
            lines += flags_table(result)
        else:
            lines += jax_table(result)
    return "\n".join(lines) + "\n"


def sees_a_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def driver(args) -> int:
    if not args.smoke and not sees_a_gpu():
        print("device_check: no GPU (nvidia-smi -L); the CPU dry run is --smoke", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.budget
    phases = [name for name in PHASES if name in args.phases.split(",")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One compilation cache for every phase (the flags phase's baseline is ViT-B's MAE program), kept
    # beside the machine's other temporary files so that a second call on a warm machine compiles nothing
    # it compiled before (the key is the program and the options, so a changed program compiles anew).
    env.setdefault(
        "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(tempfile.gettempdir()) / "prmim_jax_compilation_cache")
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        # The smoke run checks that the code runs, not how fast: without XLA CPU's optimisations and fusion
        # emitters a tiny train step compiles in 1.7 CPU seconds instead of 11 (jax 0.10.2, measured).
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
    else:
        # The batch fills the card; torch runs in its own process after the JAX phases have ended.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    command = "bash benchmarks/device_check.sh " + " ".join(args.argv)
    run = {
        "meta": {
            "command": command,
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "versions": versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "budget_seconds": args.budget,
            "smoke": args.smoke,
        },
        "phases_requested": phases,
        "phases": {},
    }

    def write():
        run["meta"]["seconds"] = time.time() - started
        (out / "device_check.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
        (out / "device_check.md").write_text(report(run))

    write()
    with open(out / "device_check.log", "a") as log, tempfile.TemporaryDirectory(prefix="device_check_") as work:
        for i, name in enumerate(phases):
            reserve = 0 if args.smoke else sum(RESERVE_SECONDS[later] for later in phases[i + 1 :])
            phase_deadline = deadline - reserve
            if not args.smoke and phase_deadline - time.time() < MIN_SECONDS[name]:
                run["phases"][name] = {"status": "skipped: out of time"}
                write()
                continue
            spec = phase_spec(name, args.smoke, (run["phases"].get("vit_b") or {}).get("result"))
            phase_started = time.time()
            result, status = run_phase(name, spec, phase_deadline, pathlib.Path(work), log, env)
            run["phases"][name] = {"status": status, "seconds": time.time() - phase_started, "result": result}
            write()
            print(f"device_check: {name}: {status} ({time.time() - phase_started:.0f} s)", file=sys.stderr)
    write()
    print(report(run))
    failed = [name for name, phase in run["phases"].items() if not phase["status"].startswith("ok")]
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="folder for device_check.{md,json,log}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code, not the card")
    parser.add_argument("--budget", type=float, default=430.0, help="seconds for every phase together")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--missing_wheels", metavar="DIR", help="print the wheels in DIR not installed here, and stop")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # one phase in this process (the driver's subprocess)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.missing_wheels:
        for wheel in missing_wheels(pathlib.Path(args.missing_wheels)):
            print(wheel)
        return 0
    if args.phase:
        spec = json.loads(args.spec)
        jax_phase(spec, pathlib.Path(args.result), Deadline(args.deadline, spec["after_compiles"]))
        # What it measured is written; a compilation that missed the deadline must not hold the exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if not args.out:
        parser.error("OUT is required")
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
