"""Fine-tuning a small Swin Transformer on Fashion-MNIST: ``finetune_fmnist.py:recipe=table14`` with a Swin.

    python -m prmim_jax.main --config configs/finetune_swin_fmnist.py --workdir workdirs/fmnist_swin_ft
    python -m prmim_jax.main --config configs/finetune_swin_fmnist.py:runlocal --workdir /tmp/swin_ft
    python -m prmim_jax.main --config configs/finetune_swin_fmnist.py --workdir workdirs/fmnist_swin_ft2 \\
        --config.init.workdir=workdirs/fmnist_swin_ft   # start from a Swin run (a GreenMIM pretraining, later)

Without ``--config.init.workdir`` (or ``--config.init.checkpoint`` for a file in the
official / timm layout) the Swin trains from scratch. The recipe, loop and data are
``finetune_fmnist.py:recipe=table14``'s (Table 14's AdamW, drop path 0.1, RandAug, random erasing,
mixup / cutmix, label smoothing, warmup + cosine); argument: comma-separated
``steps=N``, ``seed=N``, ``runlocal``.

The geometry, for 28 x 28 images: Swin's patch 4 would leave a 7 x 7 grid, one window
and no shifted block at all. Patch 2 gives a 14 x 14 grid, the grid a 56 x 56 image
gives at patch 4 without resizing the images (a resize would add no information and cost
four times the pixels): stage 0 has 2 x 2 windows of Swin's 7 x 7, so its odd blocks
shift by 3 under the cyclic-shift mask, and patch merging leaves a 7 x 7 grid for stage 1,
one window (the official rule: a grid no larger than the window is one window, unshifted).
That grid is odd, so two stages is as deep as a Swin goes here; they are Swin-T's first
and third stages in proportion (depths 2 and 6, heads 2 and 4 of width 32 each, mlp ratio
4) at width 64, about half the ViT fine-tune's compute per image. Layer-wise lr decay is
0.8 over the 8 blocks + 2 (Swin-B's 0.9 over 24 + 2 scales its embedding by 0.07, 0.8 here
by 0.13).
"""

from configs import common, finetune_fmnist
from prmim_jax.models import classifier


def get_config(arg=None):
    options = common.parse_arg(arg, steps=int, seed=0, runlocal=False)
    table14 = ["recipe=table14", f"seed={options.seed}"] + [f"steps={options.steps}"] * (options.steps is not None)
    config = finetune_fmnist.get_config(",".join(table14 + ["runlocal"] * options.runlocal))
    config.model = classifier.swin_classifier_config(
        "T",
        width=64,
        depths=(2, 6),
        num_heads=(2, 4),
        patch_size=2,
        window_size=7,
        image_size=28,
        channels=1,
        num_classes=10,
        drop_path_rate=0.1,
    )
    config.optimizer.layer_decay = 0.8
    return config
