"""Gradient-difference analysis (the paper's Fig. 4): how far partial reconstruction's and
PR-MIM's gradients stray from MAE's under the same visible tokens.

For one batch and one set of parameters, the MAE gradient uses every masked
token. Each throwing sampler then splits the same masked tokens into decoded
and thrown ones at each ``rho_d``; ``partial`` differentiates the loss over the
decoded tokens only, ``prmim`` adds the thrown tokens through the aggregation.
Each row reports ``||g - g_mae|| / ||g_mae||`` over the parameters MAE has
(the aggregation's own parameters have no MAE counterpart).

    python -m prmim_jax.tools.grad_diff --variant Ti/2 --image_size 28 --channels 1 \\
        --decoder_width 128 --decoder_depth 2 --batch 32

runs it at initialisation on random images; ``--checkpoint`` starts from an
official MAE checkpoint (the aggregation keeps its initialisation) and
``--images`` reads a ``.npy`` batch ``[B, H, W, C]``. Along training (the
curve of Fig. 4), ``benchmarks/ablation_fmnist.py --phase graddiff`` calls
``gradient_differences`` on every saved checkpoint of a PR-MIM run.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prmim_jax import masking, methods
from prmim_jax.interop import mae_checkpoint
from prmim_jax.methods import mae as mae_family
from prmim_jax.models import mae as mae_lib

THROWING_SAMPLERS = ("random_throw", "furthest")


def gradient_differences(
    model_config: ml_collections.ConfigDict,
    params: dict,
    images: jax.Array,
    noise: np.ndarray,
    throw_ratios=(0.25, 0.5, 0.65),
    samplers=THROWING_SAMPLERS,
    mask_ratio: float = 0.75,
    kernel_size: int = 7,
) -> list[dict]:
    """Rows ``{method, sampler, rho_d, relative_l2}`` for ``partial`` and ``prmim``.

    Args:
      model_config: the model section (``mae.model_config``).
      params: parameters of the PR-MIM model (with ``aggregation``); MAE and
        partial use the rest of them.
      images: ``[B, H, W, C]``.
      noise: ``[B, 2, N]`` per-image sampler noise; row 0 fixes the visible
        tokens for every method.
    """

    def build(name, sampler, throw_ratio):
        config = methods.method_config(
            name, sampler=sampler, throw_ratio=throw_ratio, mask_ratio=mask_ratio, kernel_size=kernel_size
        )
        return mae_family.from_sections(model_config, config)

    def gradient(method, ids, model_params):
        return jax.jit(jax.grad(lambda p: method.objective(p, images, ids)))(model_params)

    shared = {k: v for k, v in params.items() if k != "aggregation"}
    mae_method = build("mae", "random", 0.0)
    mae_grad = gradient(mae_method, mae_method.sample(noise), shared)
    mae_norm = optax.tree.norm(mae_grad)
    rows = []
    for sampler in samplers:
        for throw_ratio in throw_ratios:
            for name in ("partial", "prmim"):
                method = build(name, sampler, throw_ratio)
                ids = method.sample(noise)
                grad = gradient(method, ids, params if method.throwing.progressive else shared)
                difference = jax.tree_util.tree_map(jnp.subtract, {k: grad[k] for k in shared}, mae_grad)
                relative = float(optax.tree.norm(difference) / mae_norm)
                rows.append({"method": name, "sampler": sampler, "rho_d": throw_ratio, "relative_l2": relative})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--decoder_width", type=int, default=512)
    parser.add_argument("--decoder_depth", type=int, default=8)
    parser.add_argument("--decoder_num_heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--throw_ratios", default="0.25,0.5,0.65")
    parser.add_argument("--checkpoint", default=None, help="official MAE checkpoint (.pth / .safetensors) with decoder")
    parser.add_argument("--images", default=None, help=".npy batch [B, H, W, C]; random normal images otherwise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_config = mae_lib.model_config(
        args.variant,
        image_size=args.image_size,
        channels=args.channels,
        decoder_width=args.decoder_width,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )
    method = mae_family.from_sections(model_config, methods.method_config("prmim"))
    model = method.model
    rng = np.random.default_rng(args.seed)
    if args.images:
        images = jnp.asarray(np.load(args.images), jnp.float32)
    else:
        images = jnp.asarray(rng.normal(size=(args.batch, *model.image_size, model.channels)), jnp.float32)
    noise = np.stack([masking.draw_noise(rng, method.layout) for _ in range(images.shape[0])])
    ids = method.sample(noise)
    params = nn.unbox(model.init(jax.random.key(args.seed), images, *ids))["params"]
    if args.checkpoint:
        params = mae_checkpoint.merge_into(params, mae_checkpoint.load(args.checkpoint, model))
    rows = gradient_differences(model_config, params, images, noise, [float(r) for r in args.throw_ratios.split(",")])
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
