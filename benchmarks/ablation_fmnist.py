"""The paper's Table 2 ablation at small scale, on Fashion-MNIST (14 x 14 token grid).

    python benchmarks/ablation_fmnist.py --workdir workdirs/ablation --seeds 0,1,2 --phase all \\
        --out benchmarks/results/ablation_fmnist

Rows: MAE (rho_d = 0), and for each rho_d in ``--throw_ratios`` partial reconstruction
and PR-MIM, each with random and furthest sampling, plus PR-MIM with furthest sampling
seeded by the visible tokens. Every row pretrains the same ViT (``configs/pretrain_fmnist.py``
with ``size=small``: width 64, depth 4, decoder 64 x 2) for the same number of steps with
the same batch, once per seed, through the real entry point (``python -m prmim_jax.main``);
each run is then fine-tuned (``configs/finetune_fmnist.py``) and its kNN accuracy read from
pretraining's final evaluation. Phases (each skips work already done, so a rerun resumes):

- ``pretrain``: the pretraining runs, rho_d = 0.5 rows first, seed by seed.
- ``finetune``: fine-tunes each finished pretraining run.
- ``cost``: XLA's FLOPs and peak temporary memory per train step and the step-time ratio
  to MAE, every row compiled and timed side by side in one process.
- ``graddiff``: the gradient difference to MAE (Fig. 4) at each saved pretraining step.
- ``report``: the table (mean and spread over seeds), then ``plots``.
- ``plots``: the ablation's plot and Fig. 4's curves (``benchmarks/plots.py``,
  matplotlib), from the results files alone.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
PRETRAIN_CONFIG = REPO / "configs" / "pretrain_fmnist.py"


def rows(throw_ratios: list[float]) -> list[dict]:
    """The ablation's rows: ``{method, sampler, rho_d}``; MAE first, then rho_d in the given order."""
    table = [dict(method="mae", sampler="random", rho_d=0.0)]
    for rho in throw_ratios:
        for method in ("partial", "prmim"):
            for sampler in ("random_throw", "furthest"):
                table.append(dict(method=method, sampler=sampler, rho_d=rho))
        table.append(dict(method="prmim", sampler="furthest_seeded", rho_d=rho))
    return table


def run_name(row: dict, seed: int) -> str:
    return f"{row['method']}_{row['sampler']}_rho{row['rho_d']}_seed{seed}"


def pretrain_arg(row: dict, seed: int, steps: int) -> str:
    arg = f"size=small,method={row['method']},sampler={row['sampler']},seed={seed},steps={steps}"
    return arg + (f",throw={row['rho_d']}" if row["method"] != "mae" else "")


def final_metrics(workdir: pathlib.Path) -> dict:
    """The last values of every scalar in ``workdir/metrics.jsonl`` (empty if there is none)."""
    values = {}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            values.update(json.loads(line))
    return values


def pretrain(args, table):
    for seed_group in _priority(table, args.seeds):
        for row, seed in seed_group:
            workdir = args.workdir / "pretrain" / run_name(row, seed)
            if "knn_accuracy" in final_metrics(workdir):
                continue
            command = [
                sys.executable, "-m", "prmim_jax.main",
                f"--config={PRETRAIN_CONFIG}:{pretrain_arg(row, seed, args.steps)}",
                f"--workdir={workdir}",
                f"--config.checkpoint_every={args.checkpoint_every}",
                f"--config.keep_checkpoints={args.steps // args.checkpoint_every + 1}",
                f"--config.evals.reconstruction.every={args.steps}",
            ]  # fmt: skip
            print("+", " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=REPO)


def _priority(table, seeds):
    """rho_d = 0.5 rows (and MAE) for every seed first, then the other ratios, seed by seed."""
    first = [row for row in table if row["rho_d"] in (0.0, 0.5)]
    rest = [row for row in table if row not in first]
    return [[(row, seed) for row in first] for seed in seeds] + [[(row, seed) for row in rest] for seed in seeds]


FINETUNE_CONFIG = REPO / "configs" / "finetune_fmnist.py"


def finetune(args, table):
    for seed_group in _priority(table, args.seeds):
        for row, seed in seed_group:
            name = run_name(row, seed)
            pretrained = args.workdir / "pretrain" / name
            workdir = args.workdir / "finetune" / name
            if "knn_accuracy" not in final_metrics(pretrained) or "accuracy" in final_metrics(workdir):
                continue
            command = [
                sys.executable, "-m", "prmim_jax.main",
                f"--config={FINETUNE_CONFIG}:size=small,short,seed={seed},steps={args.finetune_steps}",
                f"--workdir={workdir}",
                f"--config.init.workdir={pretrained}",
                f"--config.optimizer.base_lr={args.finetune_lr}",
            ]  # fmt: skip
            print("+", " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=REPO)


def _model_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_fmnist", PRETRAIN_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("size=small").model


def cost(args, table):
    """FLOPs, peak temporary memory and step time of every (method, rho_d), side by side in this process."""
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_time

    programs = {}
    for row in table:
        key = (row["method"], row["rho_d"])
        if key not in programs:
            programs[key] = step_time.prepare(_model_config(), row["method"], row["rho_d"], batch=128)
    for program in programs.values():  # warm-up
        program["state"], metrics = program["compiled"](program["state"], program["data"], jax.random.key(0))
        jax.block_until_ready(metrics)
        program["seconds"] = []
    for _ in range(args.cost_rounds):  # interleaved, so machine noise hits every program alike
        for program in programs.values():
            start = time.perf_counter()
            for _ in range(2):
                program["state"], metrics = program["compiled"](program["state"], program["data"], jax.random.key(0))
            jax.block_until_ready(metrics)
            program["seconds"].append((time.perf_counter() - start) / 2)
    mae = programs[("mae", 0.0)]
    mae_seconds = float(np.median(mae["seconds"]))
    mae_memory = mae["compiled"].memory_analysis().temp_size_in_bytes
    results = []
    for (method, rho), program in programs.items():
        memory = program["compiled"].memory_analysis().temp_size_in_bytes
        seconds = float(np.median(program["seconds"]))
        results.append(
            dict(
                method=method,
                rho_d=rho,
                flops_per_step=program["flops"],
                flops_vs_mae=program["flops"] / mae["flops"],
                temp_bytes=memory,
                memory_vs_mae=memory / mae_memory,
                step_seconds=seconds,
                step_time_vs_mae=seconds / mae_seconds,
            )
        )
    (args.workdir / "cost.json").write_text(json.dumps(results, indent=1))
    return results


def graddiff(args):
    """Fig. 4: partial's and PR-MIM's gradient distance to MAE's at each saved step of one PR-MIM run."""
    import jax
    import numpy as np

    from prmim_jax import masking, runs
    from prmim_jax.data import pipeline, schema
    from prmim_jax.tools import grad_diff

    run = args.workdir / "pretrain" / run_name(dict(method="prmim", sampler="furthest", rho_d=0.5), args.seeds[0])
    config, method, _, _ = runs.load(run)
    data = schema.data_config(source="fashion_mnist")
    images = next(iter(pipeline.eval_dataset(data, "train", batch_size=args.graddiff_batch)))["images"]
    images = np.asarray(method.normalize(images))  # the pipeline hands over uint8 pixels
    rng = np.random.default_rng(0)
    noise = np.stack([masking.draw_noise(rng, method.layout) for _ in range(len(images))])
    from prmim_jax import checkpoint

    steps = checkpoint.Checkpointer(run / "checkpoints", asynchronous=False).all_steps()
    rows = []
    for step in steps:
        params = runs.load(run, step).variables.params
        for row in grad_diff.gradient_differences(config.model, params, jax.numpy.asarray(images), noise):
            rows.append({"step": step, **row})
            print(rows[-1], flush=True)
    (args.workdir / "graddiff.json").write_text(json.dumps(rows, indent=1))
    return rows


def _mean_spread(values):
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def report(args, table):
    cost_path = args.workdir / "cost.json"
    cost_rows = {(r["method"], r["rho_d"]): r for r in json.loads(cost_path.read_text())} if cost_path.exists() else {}
    mae_row = table[0]
    mae_runs = {
        s: (
            final_metrics(args.workdir / "pretrain" / run_name(mae_row, s)),
            final_metrics(args.workdir / "finetune" / run_name(mae_row, s)),
        )
        for s in args.seeds
    }
    results = []
    for row in table:
        runs = {
            s: (
                final_metrics(args.workdir / "pretrain" / run_name(row, s)),
                final_metrics(args.workdir / "finetune" / run_name(row, s)),
            )
            for s in args.seeds
        }
        runs = {s: (p, f) for s, (p, f) in runs.items() if "knn_accuracy" in p}
        if not runs:
            continue

        def paired(metric, which, runs=runs):
            # Same seed, same initialisation of the shared parameters, same batches and visible tokens as MAE's run.
            return _mean_spread(
                [
                    run[which][metric] - mae_runs[s][which][metric]
                    for s, run in runs.items()
                    if metric in run[which] and metric in mae_runs[s][which]
                ]
            )

        results.append(
            dict(
                row,
                seeds=sorted(runs),
                knn=_mean_spread([p["knn_accuracy"] for p, _ in runs.values()]),
                finetune=_mean_spread([f.get("accuracy") for _, f in runs.values()]),
                knn_vs_mae=paired("knn_accuracy", 0),
                finetune_vs_mae=paired("accuracy", 1),
                pretrain_loss=_mean_spread([p["loss"] for p, _ in runs.values()]),
                cost=cost_rows.get((row["method"], row["rho_d"])),
            )
        )
    lines = [
        f"Fashion-MNIST, ViT (width 64, depth 4, patch 2: 14x14 tokens; decoder 64 x 2), {args.steps} pretraining "
        f"steps of batch 128 per row, mask ratio 0.75; fine-tuning {args.finetune_steps} steps of batch 128 "
        f"(configs/finetune_fmnist.py:size=small,short, base lr {args.finetune_lr}); kNN k=20 on 5000 / 2000 images. "
        "Top-1 in %: mean +- sample standard deviation (number of seeds). A seed fixes the initialisation of the "
        "parameters all methods share, the batches, crops and visible tokens, so the '- MAE' columns are paired "
        "differences to MAE's run of the same seed. Cost columns: XLA CPU's compiled train step at batch 128 "
        "(FLOPs and peak temporary memory over MAE's); step time over MAE's, timed side by side in one process.",
        "",
        "| method | sampler | rho_d | fine-tune top-1 | fine-tune - MAE | kNN top-1 | kNN - MAE | pretrain loss | FLOPs / MAE | memory / MAE | step time / MAE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(stat, signed=False):
        mean, spread, n = stat
        if mean is None:
            return "-"
        sign = "+" if signed else ""
        return f"{100 * mean:{sign}.2f} +- {100 * spread:.2f} ({n})" if n > 1 else f"{100 * mean:{sign}.2f} (1)"

    for r in results:
        c = r["cost"] or {}
        mae = r["method"] == "mae"
        lines.append(
            f"| {r['method']} | {r['sampler']} | {r['rho_d']} | {pct(r['finetune'])} | "
            f"{'-' if mae else pct(r['finetune_vs_mae'], True)} | {pct(r['knn'])} | "
            f"{'-' if mae else pct(r['knn_vs_mae'], True)} | {r['pretrain_loss'][0]:.4f} | "
            f"{c.get('flops_vs_mae', float('nan')):.3f} | {c.get('memory_vs_mae', float('nan')):.3f} | "
            f"{c.get('step_time_vs_mae', float('nan')):.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    graddiff_path = args.workdir / "graddiff.json"
    if graddiff_path.exists():
        rows = json.loads(graddiff_path.read_text())
        args.out.parent.joinpath(args.out.name + "_graddiff.json").write_text(json.dumps(rows, indent=1) + "\n")
        table_lines = ["| step | method | sampler | rho_d | relative L2 to MAE's gradient |", "|---|---|---|---|---|"]
        table_lines += [
            f"| {r['step']} | {r['method']} | {r['sampler']} | {r['rho_d']} | {r['relative_l2']:.4f} |" for r in rows
        ]
        args.out.parent.joinpath(args.out.name + "_graddiff.md").write_text("\n".join(table_lines) + "\n")


def draw(out: pathlib.Path) -> None:
    """The ablation's plots from its results files (``OUT.json``, ``OUT_graddiff.json``): ``OUT_plot.png`` and the
    Fig. 4 curves ``OUT_graddiff.png``."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import plots

    results_path = out.with_suffix(".json")
    if results_path.exists():
        plots.ablation(
            json.loads(results_path.read_text()),
            out.parent / (out.name + "_plot.png"),
            {"finetune": "fine-tune", "knn": "kNN (k=20)"},
            title="Fashion-MNIST at small scale: mean +- std over seeds",
        )
    graddiff_path = out.parent / (out.name + "_graddiff.json")
    if graddiff_path.exists():
        plots.gradient_distance(json.loads(graddiff_path.read_text()), out.parent / (out.name + "_graddiff.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "workdirs" / "ablation")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "ablation_fmnist")
    parser.add_argument(
        "--phase", default="all", choices=("pretrain", "finetune", "cost", "graddiff", "report", "plots", "all")
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--throw_ratios", default="0.5,0.25,0.65")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps of batch 128, every row")
    parser.add_argument("--checkpoint_every", type=int, default=50)
    parser.add_argument("--finetune_steps", type=int, default=60, help="fine-tuning steps of batch 128, every run")
    parser.add_argument("--finetune_lr", type=float, default=1e-2, help="fine-tuning base lr (x 128 / 256)")
    parser.add_argument("--cost_rounds", type=int, default=3)
    parser.add_argument("--graddiff_batch", type=int, default=64)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    table = rows([float(r) for r in args.throw_ratios.split(",")])
    os.makedirs(args.workdir, exist_ok=True)
    if args.phase in ("pretrain", "all"):
        pretrain(args, table)
    if args.phase in ("finetune", "all"):
        finetune(args, table)
    if args.phase in ("cost", "all"):
        cost(args, table)
    if args.phase in ("graddiff", "all"):
        graddiff(args)
    if args.phase in ("report", "all"):
        report(args, table)
    if args.phase in ("report", "plots", "all"):
        draw(args.out)


if __name__ == "__main__":
    main()
