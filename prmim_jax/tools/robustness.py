"""Robustness and transfer of a finished fine-tuning run: ImageNet-A, -R, -C, -V2, -Sketch, ... (the paper's Table 7).

    python -m prmim_jax.tools.robustness --workdir FINETUNE_WORKDIR \\
        --datasets imagenet_a,imagenet_r,imagenet2012_corrupted,imagenet_v2 --data_dir ~/tensorflow_datasets

Scoring is ``prmim_jax.evaluate.robustness``'s (its docstring has the class subsets and
ImageNet-C's mCE); this is its command line, on a run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax
import numpy as np
from etils import epath

from prmim_jax import distributed, runs
from prmim_jax.evaluate import robustness


def load_classifier(workdir: str | os.PathLike):
    """``(predict_fn, data_config)`` of a fine-tuning run's latest checkpoint, on this host's devices.

    ``predict_fn(images [b, H, W, C] uint8 pixels, or float32 normalised per
    ``data_config``) -> logits [b, num_classes] numpy float32``, jitted; ``data_config`` is the
    run's data section (image size, normalisation, evaluation crop).
    """
    run = runs.load(workdir)
    logits = run.method.predict_fns().get("logits")
    if logits is None:
        raise ValueError(
            f"{workdir} is a {run.method.name!r} run, not a classifier; point it at a fine-tuning workdir."
        )
    apply = jax.jit(logits)

    def predict_fn(images):
        return np.asarray(apply(run.variables, images))

    return predict_fn, run.config.data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the fine-tuning run's workdir (load_classifier reads it)")
    parser.add_argument(
        "--datasets",
        default="imagenet_a,imagenet_r,imagenet2012_corrupted,imagenet_v2",
        help="comma-separated TFDS NAME[:SPLIT]; imagenet2012_corrupted alone is the whole ImageNet-C (mCE)",
    )
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: the fine-tuning config's)")
    parser.add_argument("--batch_size", type=int, default=256, help="global evaluation batch")
    parser.add_argument("--out", default=None, help="results JSON (default: WORKDIR/robustness.json)")
    parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    distributed.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    predict_fn, data_config = load_classifier(args.workdir)
    results = robustness.evaluate_datasets(
        predict_fn,
        data_config,
        robustness.parse_datasets(args.datasets),
        batch_size=args.batch_size,
        data_dir=args.data_dir,
    )
    if jax.process_index() == 0:
        out = epath.Path(args.out or epath.Path(args.workdir) / "robustness.json")
        out.write_text(json.dumps(results, indent=2, sort_keys=True))
        print(robustness.format_table(results))
        print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
