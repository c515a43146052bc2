"""Fault injection: signals at random moments, damaged checkpoints and killed processes, then resume.

    python benchmarks/fault_injection.py --workdir /tmp/faults --trials 8 --out benchmarks/results/fault_injection

Every trial runs the real entry point (``python -m prmim_jax.main``, or ``launch/local.sh
--processes 2`` for the multi-process rows) on a tiny Fashion-MNIST pretraining run, injects
one fault, measures how long the run took to stop, then reruns the same command until it
finishes and compares the result with an uninterrupted reference run of the same process
count: the final parameters bit for bit and the loss of every step. Rows:

- ``sigterm`` / ``sigkill``: one process, the signal at a moment drawn uniformly over the
  reference run's wall time (start-up, compiling, training, saves, the final evaluation).
- ``damage:<kind>``: the run is stopped after a few steps (``stop_after``), its newest
  checkpoint damaged (``DAMAGES``), and the rerun must set it aside and resume from the one
  before.
- ``kill_one_of_two``: two processes under ``launch/local.sh``, one SIGKILLed at a random
  moment; the launcher must return within its grace period.
- ``sigterm_launcher``: SIGTERM to ``launch/local.sh`` running two processes, at a random moment.

Columns: trials, restorable (the rerun finished), bit-exact (final parameters and per-step
losses equal the reference's), and the time from the fault to the run having stopped
(median and worst). Nothing here is timed against a threshold; the table is the record.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 16
TINY = [
    f"--config={REPO / 'configs' / 'pretrain_fmnist.py'}:runlocal,steps={STEPS}",
    "--config.model.width=32",
    "--config.model.depth=1",
    "--config.model.num_heads=2",
    "--config.model.decoder_width=16",
    "--config.model.decoder_depth=1",
    "--config.model.decoder_num_heads=2",
    "--config.batch_size=16",
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.optimizer.warmup_steps=2",
    "--config.evals.knn.train_examples=100",
    "--config.evals.knn.test_examples=50",
    "--config.evals.knn.batch_size=50",
    "--config.evals.reconstruction.every=0",
]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PRMIM_PLATFORM="cpu")
PYTHON = sys.executable


def single_process_command(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "prmim_jax.main", "--workdir", str(workdir), *TINY, *extra]


def launcher_command(workdir: pathlib.Path, *extra: str) -> list[str]:
    config, *flags = TINY
    return [
        "bash",
        str(REPO / "launch" / "local.sh"),
        "--processes",
        "2",
        "--skip_setup",
        config.removeprefix("--config="),
        str(workdir),
        *flags,
        *extra,
    ]


def start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_to_end(command: list[str], log: pathlib.Path, timeout: float = 900) -> int:
    process = start(command, log)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return -1


def training_processes(workdir: pathlib.Path) -> list[int]:
    """The process ids of ``python -m prmim_jax.main`` runs writing into ``workdir`` (from /proc, no psutil)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"prmim_jax.main" in argv and str(workdir).encode() in argv:
                found.append(int(entry.name))
    return found


def wait_exit(process: subprocess.Popen, since: float, limit: float = 600) -> float:
    """Seconds from ``since`` until ``process`` (and its process group) has exited; ``inf`` past ``limit``."""
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return float("inf")
    return time.perf_counter() - since


def losses(workdir: pathlib.Path) -> dict[int, float]:
    """The loss of every step, the last logged value winning (a step redone after a kill logs twice)."""
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def final_parameters(workdir: pathlib.Path):
    from prmim_jax import runs

    run = runs.load(workdir)
    return run.step, run.variables.params


def same_run(workdir: pathlib.Path, reference: pathlib.Path) -> bool:
    """Bit-exact: the final checkpoint's parameters and every step's loss equal the reference's."""
    import jax

    step, params = final_parameters(workdir)
    ref_step, ref_params = final_parameters(reference)
    if step != ref_step or losses(workdir) != losses(reference):
        return False
    leaves, ref_leaves = jax.tree.leaves(params), jax.tree.leaves(ref_params)
    return len(leaves) == len(ref_leaves) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, ref_leaves, strict=True)
    )


def finish(command: list[str], workdir: pathlib.Path, reference: pathlib.Path) -> tuple[bool, bool]:
    """``(restorable, bit_exact)`` after rerunning ``command`` to the end (twice at most)."""
    for _ in range(2):
        if run_to_end(command, workdir / "trial.log") == 0 and losses(workdir).get(STEPS) is not None:
            try:
                return True, same_run(workdir, reference)
            except Exception as error:  # an unreadable final checkpoint is a failed trial
                print(f"  {workdir}: final checkpoint unreadable: {error}", file=sys.stderr)
                return False, False
    return False, False


# --- damages -------------------------------------------------------------------------------------


def _largest(files: list[pathlib.Path]) -> pathlib.Path:
    return max(files, key=lambda f: f.stat().st_size)


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]


def _iterator_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((step_dir / "data").glob("process_*.json"))


def truncate_array_file(step_dir):
    target = _largest(_array_files(step_dir))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def flip_array_bytes(step_dir):
    target = _largest(_array_files(step_dir))
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    target.write_bytes(bytes(data))


def delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def delete_iterator_state(step_dir):
    _iterator_files(step_dir)[0].unlink()


def empty_iterator_state(step_dir):
    _iterator_files(step_dir)[0].write_text("")


def flip_iterator_state(step_dir):
    target = _iterator_files(step_dir)[0]
    text = target.read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    target.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])


def remove_state_item(step_dir):
    shutil.rmtree(step_dir / "state")


DAMAGES = {
    "truncated_array_file": truncate_array_file,
    "flipped_array_bytes": flip_array_bytes,
    "deleted_METADATA": delete_metadata,
    "deleted_iterator_json": delete_iterator_state,
    "empty_iterator_json": empty_iterator_state,
    "flipped_iterator_digit": flip_iterator_state,
    "removed_state_item": remove_state_item,
}


# --- scenarios -----------------------------------------------------------------------------------


def random_fault_trial(command, workdir, reference, wall, rng, inject) -> dict:
    """Starts ``command``, calls ``inject(process)`` at a moment drawn uniformly over ``wall`` seconds (if it
    still runs), times its exit, then reruns it to the end and compares with ``reference``."""
    process = start(command, workdir / "trial.log")
    delay = rng.uniform(0, wall)
    time.sleep(delay)
    sent = time.perf_counter()
    if process.poll() is None:
        inject(process)
    stopped = wait_exit(process, sent)
    restorable, exact = finish(command, workdir, reference)
    return dict(delay=delay, stop_seconds=stopped, restorable=restorable, bit_exact=exact)


def signal_trial(workdir, reference, wall, rng, signum) -> dict:
    """One process, ``signum`` at a random moment."""
    command = single_process_command(workdir)
    return random_fault_trial(command, workdir, reference, wall, rng, lambda process: process.send_signal(signum))


def damage_trial(workdir, reference, damage: str) -> dict:
    command = single_process_command(workdir)
    run_to_end([*command, "--config.stop_after=8"], workdir / "trial.log")
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    DAMAGES[damage](workdir / "checkpoints" / str(newest))
    started = time.perf_counter()
    restorable, exact = finish(command, workdir, reference)
    set_aside = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith(f"{newest}.")]
    return dict(
        damaged_step=newest,
        stop_seconds=0.0,
        seconds_to_finish=time.perf_counter() - started,
        restorable=restorable,
        bit_exact=exact and bool(set_aside),
        set_aside=set_aside,
    )


def launcher_trial(workdir, reference, wall, rng, fault: str) -> dict:
    """Two processes under ``launch/local.sh``; ``fault`` is ``kill_one`` (SIGKILL to one of them) or
    ``sigterm_launcher`` (SIGTERM to the launcher), at a random moment."""

    def inject(launcher):
        if fault != "kill_one":
            launcher.send_signal(signal.SIGTERM)
        elif victims := training_processes(workdir):
            os.kill(rng.choice(victims), signal.SIGKILL)

    return random_fault_trial(launcher_command(workdir), workdir, reference, wall, rng, inject)


def reference_run(workdir: pathlib.Path, command: list[str]) -> float:
    """Runs ``command`` uninterrupted into ``workdir`` (once; reused after that); returns its wall time."""
    marker = workdir / "wall_seconds"
    if marker.exists():
        return float(marker.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    began = time.perf_counter()
    if run_to_end(command, workdir / "trial.log") != 0:
        raise RuntimeError(f"the reference run failed; see {workdir / 'trial.log'}")
    wall = time.perf_counter() - began
    marker.write_text(str(wall))
    return wall


def summarise(name: str, trials: list[dict]) -> dict:
    stops = [t["stop_seconds"] for t in trials]
    return dict(
        scenario=name,
        trials=len(trials),
        restorable=sum(t["restorable"] for t in trials),
        bit_exact=sum(t["bit_exact"] for t in trials),
        median_stop_seconds=statistics.median(stops) if stops else None,
        worst_stop_seconds=max(stops) if stops else None,
    )


def markdown(rows: list[dict], command: str, facts: dict) -> str:
    lines = [
        "# Fault injection",
        "",
        f"Command: `{command}`",
        "",
        "Each trial injects one fault into a tiny Fashion-MNIST pretraining run (the real entry point), "
        "reruns the same command until it finishes, and compares the final parameters (bit for bit) "
        "and every step's loss with an uninterrupted run of the same process count. "
        "'stop' is the time from the fault to the run having exited (damage rows: not applicable).",
        "",
        "| scenario | trials | restorable | bit-exact | median stop (s) | worst stop (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        median, worst = row["median_stop_seconds"], row["worst_stop_seconds"]
        lines.append(
            f"| {row['scenario']} | {row['trials']} | {row['restorable']} | {row['bit_exact']} "
            f"| {'-' if not worst else f'{median:.1f}'} | {'-' if not worst else f'{worst:.1f}'} |"
        )
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--trials", type=int, default=8, help="trials per signal / process scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default="sigterm,sigkill,damage,kill_one_of_two,sigterm_launcher")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    scenarios = args.scenarios.split(",")
    one_ref = args.workdir / "reference_one"
    two_ref = args.workdir / "reference_two"
    one_wall = reference_run(one_ref, single_process_command(one_ref))
    two_wall = (
        reference_run(two_ref, launcher_command(two_ref))
        if {"kill_one_of_two", "sigterm_launcher"} & set(scenarios)
        else 0.0
    )
    rows, details = [], {}

    def trials(name, make):
        results = []
        for index in range(args.trials if not name.startswith("damage:") else 1):
            workdir = args.workdir / f"{name.replace(':', '_')}_{index}"
            shutil.rmtree(workdir, ignore_errors=True)
            result = make(workdir)
            print(f"{name} #{index}: {result}", flush=True)
            results.append(result)
        details[name] = results
        rows.append(summarise(name, results))

    if "sigterm" in scenarios:
        trials("sigterm", lambda w: signal_trial(w, one_ref, one_wall, rng, signal.SIGTERM))
    if "sigkill" in scenarios:
        trials("sigkill", lambda w: signal_trial(w, one_ref, one_wall, rng, signal.SIGKILL))
    if "damage" in scenarios:
        for damage in DAMAGES:
            trials(f"damage:{damage}", lambda w, d=damage: damage_trial(w, one_ref, d))
    if "kill_one_of_two" in scenarios:
        trials("kill_one_of_two", lambda w: launcher_trial(w, two_ref, two_wall, rng, "kill_one"))
    if "sigterm_launcher" in scenarios:
        trials("sigterm_launcher", lambda w: launcher_trial(w, two_ref, two_wall, rng, "sigterm_launcher"))

    facts = dict(cores=os.cpu_count(), reference_wall_seconds_one=round(one_wall, 1))
    if two_wall:
        facts["reference_wall_seconds_two"] = round(two_wall, 1)
    command = "python benchmarks/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, trials=details, facts=facts), indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, command, facts))
    print(markdown(rows, command, facts))


if __name__ == "__main__":
    main()
