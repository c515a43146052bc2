"""Export a run's encoder for the tools people fine-tune with (the paper's Tables 9-10 path).

    python -m prmim_jax.export --workdir workdirs/fmnist --to mae --out encoder.pth
    python -m prmim_jax.export --workdir workdirs/fmnist --to transformers --out encoder_hf
    python -m prmim_jax.export --workdir workdirs/fmnist --to mmseg --out encoder_mmseg.pth --image_size 32

``--to`` is one of ``interop.export.FORMATS`` (``mae``, ``timm``, ``transformers``, ``mmseg``,
``mmdet``); the module docstring of ``prmim_jax.interop.export`` says which layout each writes for
each encoder (every method's: MAE, partial, PR-MIM, LocalMIM, MFF, TEC's student, SimMIM's ViT,
GreenMIM's Swin, and a fine-tuned classifier with its head). ``--step`` picks a checkpoint (the
newest by default); ``--image_size`` resizes position tables for another resolution with the code
fine-tuning uses (``classify.adapt_encoder``; SimMIM's: ``export.simmim_at_image_size``). The
file is written beside ``--out`` and renamed into place; an existing ``--out`` is refused unless
``--overwrite``. Bad input stops with one line naming the fix, before anything is written.
``docs/downstream.md`` has each target's command and config lines.
"""

from __future__ import annotations

import argparse
import os
import sys

from prmim_jax import train  # the run loader (train.load_variables)
from prmim_jax.interop import export
from prmim_jax.methods import classify
from prmim_jax.models import simmim, swin


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
    if getattr(method, "logits", None) is None:
        return encoder, params, None
    head = {name: variables.params[name] for name in ("fc_norm", "head") if name in variables.params}
    if "head_norm" in (variables.batch_stats or {}):
        head["head_norm"] = variables.batch_stats["head_norm"]
    return encoder, params, head


def at_image_size(encoder, params, image_size: int | None):
    """``(encoder, params)`` for square images of ``image_size`` (as they are for None or the same size)."""
    if image_size is None or tuple(encoder.image_size) == (image_size, image_size):
        return encoder, params
    if isinstance(encoder, swin.SwinTransformer):
        problem = swin.geometry_problem(
            (image_size, image_size), encoder.patch_size, encoder.window_size, len(encoder.depths)
        )
        if problem:
            raise export.ExportError(f"--image_size {image_size}: {problem}")
        resized = encoder.clone(image_size=(image_size, image_size))
    elif image_size % encoder.patch_size:
        raise export.ExportError(
            f"--image_size {image_size} is not a multiple of the patch size {encoder.patch_size}; "
            f"use {image_size // encoder.patch_size * encoder.patch_size} or {(image_size // encoder.patch_size + 1) * encoder.patch_size}."
        )
    elif isinstance(encoder, simmim.SimMIMEncoder):
        return export.simmim_at_image_size(encoder, params, image_size)
    else:
        # The fine-tuning rule: a learned table, initialised from the (sin-cos or learned) table resized.
        resized = encoder.clone(image_size=(image_size, image_size), learned_pos_embedding=True)
    return resized, classify.adapt_encoder(params, encoder, resized)


def run(args: argparse.Namespace, load_variables=train.load_variables) -> export.Export:
    """Exports as ``args`` say; ``load_variables(workdir, step) -> (config, method, Variables, step)``."""
    if args.to not in export.FORMATS:
        raise export.ExportError(f"--to {args.to!r} is not a format; choose one of {', '.join(export.FORMATS)}.")
    export.check_output(args.to, args.out, args.overwrite)
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        raise export.ExportError(
            f"--workdir {args.workdir} is not a run (it has no config.json): give the directory a training run "
            "wrote (python -m prmim_jax.main --workdir DIR)."
        )
    try:
        _, method, variables, step = load_variables(args.workdir, args.step)
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
