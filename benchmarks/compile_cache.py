"""The compilation cache's effect on start-up: the main job's time from the command to its first step, cold and warm.

    python benchmarks/compile_cache.py --pairs 3 --out benchmarks/results/compile_cache_cpu

Each pair launches the README's main job (``python -m prmim_jax.main --config configs/pretrain_fmnist.py``)
twice with one fresh cache directory (``--config.compilation_cache.directory``): first cold (an empty cache,
so it compiles and writes), then warm (a new workdir, the same cache). A launch runs one step
(``--config.stop_after=1``, ``--config.log_every=1``) and the time is from starting the command to its
first progress line (``step 1/500``): Python and JAX start-up, the data, the state, compiling or reading
the programs, one step. The cache keeps what took at least ``min_compile_seconds`` (the default, 1 s) to
compile. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "prmim_jax.main", "--config=configs/pretrain_fmnist.py"]
FLAGS = ["--config.stop_after=1", "--config.log_every=1"]


def time_to_first_step(workdir: pathlib.Path, cache: pathlib.Path) -> float:
    """Seconds from starting the main job to its first progress line; the launch then ends (stop_after)."""
    command = [*COMMAND, f"--workdir={workdir}", f"--config.compilation_cache.directory={cache}", *FLAGS]
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR="")  # the config's cache, not the shell's
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seconds = None
    for line in process.stdout:
        if seconds is None and line.startswith("step 1/"):
            seconds = time.perf_counter() - start
    if process.wait() != 0 or seconds is None:
        raise RuntimeError(f"{' '.join(command)} failed (status {process.returncode})")
    return seconds


def jax_version() -> str:
    return importlib.metadata.version("jax")  # not imported here: each launch starts JAX itself


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.pairs):
            cache = pathlib.Path(scratch) / f"cache{index}"
            cold = time_to_first_step(pathlib.Path(scratch) / f"cold{index}", cache)
            warm = time_to_first_step(pathlib.Path(scratch) / f"warm{index}", cache)
            entries = len(list(cache.iterdir()))
            pairs.append({"cold_seconds": cold, "warm_seconds": warm, "cache_entries": entries})
            print(f"pair {index}: cold {cold:.1f} s, warm {warm:.1f} s, {entries} cache entries", flush=True)
    cold = statistics.median(p["cold_seconds"] for p in pairs)
    warm = statistics.median(p["warm_seconds"] for p in pairs)
    load = os.getloadavg()
    result = {"pairs": pairs, "cold_median": cold, "warm_median": warm, "load_average": load, "cpus": os.cpu_count()}
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Compilation cache: the main job's time from command to first step (CPU)",
        "",
        f"Command: `python benchmarks/compile_cache.py --pairs {args.pairs} --out {args.out}`, which times "
        f"`python {' '.join(COMMAND[1:])} --workdir W --config.compilation_cache.directory C {' '.join(FLAGS)}`",
        "to its first progress line, cold (empty cache C) then warm (a new workdir W, the same C), per pair.",
        "The cache keeps the programs that took at least `min_compile_seconds` (the default, 1 s) to compile",
        "(`cache entries`); the warm launch still starts Python and JAX, reads the data, builds the state and",
        "compiles the programs quicker than that.",
        "",
        "| pair | cold s | warm s | warm / cold | cache entries |",
        "|---|---|---|---|---|",
        *(
            f"| {i} | {p['cold_seconds']:.1f} | {p['warm_seconds']:.1f} | {p['warm_seconds'] / p['cold_seconds']:.2f} "
            f"| {p['cache_entries']} |"
            for i, p in enumerate(pairs)
        ),
        f"| median | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} | |",
        "",
        f"jax {jax_version()}. Machine: the project's shared {os.cpu_count()}-core {platform.machine()} development machine, other jobs "
        f"running beside it (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), so the seconds "
        "are noisy; the pairs ran back to back, cold and warm side by side.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
