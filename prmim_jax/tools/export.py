"""Export a run's encoder for the tools people fine-tune with (the paper's Tables 9-10 path).

    python -m prmim_jax.export --workdir workdirs/fmnist --to mae --out encoder.pth
    python -m prmim_jax.export --workdir workdirs/fmnist --to transformers --out encoder_hf
    python -m prmim_jax.export --workdir workdirs/fmnist --to mmseg --out encoder_mmseg.pth --image_size 32

``--to`` is one of ``interop.export.FORMATS`` (``mae``, ``timm``, ``transformers``, ``mmseg``,
``mmdet``); the module docstring of ``prmim_jax.interop.export`` says which layout each writes for
each encoder (every method's: MAE, partial, PR-MIM, LocalMIM, MFF, TEC's student, SimMIM's ViT,
GreenMIM's Swin, and a fine-tuned classifier with its head). ``--step`` picks a checkpoint (the
newest by default); ``--image_size`` resizes position tables for another resolution with the code
fine-tuning uses (the encoder's ``resized`` and ``adapt_pretrained``). The
file is written beside ``--out`` and renamed into place; an existing ``--out`` is refused unless
``--overwrite``. Bad input stops with one line naming the fix, before anything is written.
``docs/downstream.md`` has each target's command and config lines.
"""

from __future__ import annotations

import argparse
import os
import sys

from prmim_jax import runs
from prmim_jax.interop import export


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prmim_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run's directory (what prmim_jax.main --workdir wrote)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--to", required=True, help=f"the format: one of {', '.join(export.FORMATS)}")
    parser.add_argument("--out", required=True, help="the file (a folder for --to transformers)")
    parser.add_argument("--image_size", type=int, default=None, help="resize position tables for this resolution")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def encoder_and_head(method, variables):
    """``(encoder module, its params, head or None)`` of a run: the encoder its method leaves
    (``Method.encoder``) and, for a classifier, the rest of its parameters (``fc_norm``, ``head``) and
    the running statistics of a BatchNorm head (``head_norm``)."""
    encoder, params = method.encoder(variables.params)
    if "logits" not in method.predict_fns():
        return encoder, params, None
    head = {name: variables.params[name] for name in ("fc_norm", "head") if name in variables.params}
    if "head_norm" in (variables.batch_stats or {}):
        head["head_norm"] = variables.batch_stats["head_norm"]
    return encoder, params, head


def at_image_size(encoder, params, image_size: int | None):
    """``(encoder, params)`` for square images of ``image_size`` (as they are for None or the same size)."""
    if image_size is None or tuple(encoder.image_size) == (image_size, image_size):
        return encoder, params
    try:
        resized = encoder.resized(image_size)
    except ValueError as error:
        raise export.ExportError(f"--image_size {error}") from None
    return resized, resized.adapt_pretrained(params, encoder)


def run(args: argparse.Namespace, load_run=runs.load) -> export.Export:
    """Exports as ``args`` say; ``load_run(workdir, step) -> (config, method, Variables, step)``."""
    if args.to not in export.FORMATS:
        raise export.ExportError(f"--to {args.to!r} is not a format; choose one of {', '.join(export.FORMATS)}.")
    export.check_output(args.to, args.out, args.overwrite)
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        raise export.ExportError(
            f"--workdir {args.workdir} is not a run (it has no config.json): give the directory a training run "
            "wrote (python -m prmim_jax.main --workdir DIR)."
        )
    try:
        _, method, variables, step = load_run(args.workdir, args.step)
    except FileNotFoundError as error:
        fix = "leave --step out for the newest checkpoint, or pass one of its steps" if args.step is not None else ""
        raise export.ExportError(f"{error}{' ' + fix + '.' if fix else ''}") from error
    encoder, params, head = encoder_and_head(method, variables)
    export.check(encoder, args.to, head)
    encoder, params = at_image_size(encoder, params, args.image_size)
    converted = export.convert(encoder, params, args.to, head)
    export.write(converted, args.out, args.overwrite)
    print(
        f"wrote {args.out}: step {step}, {export.family(encoder)} encoder at {encoder.image_size}, for {converted.reader}"
    )
    return converted


def main(argv=None) -> None:
    try:
        run(parse(argv))
    except export.ExportError as error:
        sys.exit(f"export: {error}")


if __name__ == "__main__":
    main()
