"""Which aggregation window suits GreenMIM's 7 x 7 unit grid: PR-MIM pretraining on Fashion-MNIST at kernels 3, 5, 7.

    python benchmarks/greenmim_kernels.py --steps 200 --out benchmarks/results/greenmim_kernels_fmnist

On ViT-B's 14 x 14 token grid the paper's 7 x 7 depth-wise window sees a quarter of the grid; on GreenMIM's
7 x 7 unit grid (zero padding 3) it sees the whole grid from the centre unit and 4 x 4 units from a corner:
nearly a global, position-dependent mixing. Table 11's smaller windows (3, 5) are the local alternatives.
Each kernel pretrains ``configs/pretrain_greenmim_fmnist.py:reconstruction=progressive,kernel=K`` for
``--steps`` steps (same seed, same data order, same token sets), then, on ``--eval_images`` test images with
fixed token sets, reports the norm-pix MSE of the thrown units (what the aggregation predicts) and of the
decoded units (what the decoder predicts), and kNN top-1. One seed per kernel: differences below the
thrown-loss spread between neighbouring checkpoints are noise (the log has the training losses).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax import masking, runs, train
from prmim_jax.data import pipeline
from prmim_jax.models import mae as mae_lib

ROOT = pathlib.Path(__file__).parent.parent


def experiment(arg: str):
    spec = importlib.util.spec_from_file_location(
        "pretrain_greenmim_fmnist", ROOT / "configs" / "pretrain_greenmim_fmnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def held_out_losses(workdir: str, num_images: int, seed: int = 0) -> dict:
    """Thrown- and decoded-unit norm-pix MSE of a run's last checkpoint on ``num_images`` test images."""
    config, method, variables, _ = runs.load(workdir)
    params = variables.params
    data = pipeline.eval_dataset(pipeline.in_process(config.data), config.data.eval_split, batch_size=num_images)
    images = method.normalize(jnp.asarray(next(iter(data))["images"]))
    rng = np.random.default_rng(seed)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(images.shape[0])]))
    output = jax.jit(method.predict)(params, images, ids)
    targets = mae_lib.pixel_targets(images, method.model.patch_size, norm_pix=True)
    thrown = mae_lib.token_mse(targets, output.pred_thrown, jnp.asarray(ids.thrown))
    decoded = mae_lib.token_mse(targets, output.pred_decoded, jnp.asarray(ids.decoded))
    return {"thrown_mse": float(thrown.mean()), "decoded_mse": float(decoded.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="3,5,7")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval_images", type=int, default=512)
    parser.add_argument("--workdir", default="/tmp/greenmim_kernels")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for kernel in (int(k) for k in args.kernels.split(",")):
        config = experiment(f"reconstruction=progressive,kernel={kernel},steps={args.steps}")
        config.batch_size = args.batch
        config.evals.reconstruction.every = 0
        workdir = f"{args.workdir}/k{kernel}"
        result = train.train_and_evaluate(config, workdir)
        row = {"kernel": kernel, "steps": args.steps, "batch": args.batch, "final_loss": result["loss"]}
        row |= {"knn_accuracy": result["knn_accuracy"]} | held_out_losses(workdir, args.eval_images)
        print(json.dumps(row))
        rows.append(row)
    lines = [
        f"GreenMIM + PR-MIM (rho_d 0.5, furthest) on Fashion-MNIST, {args.steps} steps of {args.batch} images, one "
        f"seed; held-out norm-pix MSE on {args.eval_images} test images with fixed token sets.",
        "",
        "| kernel | final training loss | thrown-unit MSE (aggregation) | decoded-unit MSE (decoder) | kNN top-1 |",
        "|---|---|---|---|---|",
    ] + [
        f"| {r['kernel']}x{r['kernel']} | {r['final_loss']:.4f} | {r['thrown_mse']:.4f} | {r['decoded_mse']:.4f} "
        f"| {r['knn_accuracy']:.4f} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
