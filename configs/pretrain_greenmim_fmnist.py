"""GreenMIM (+ partial, + PR-MIM) pretraining of a small Swin on Fashion-MNIST: Table 5's setting at this scale.

    python -m prmim_jax.main --config configs/pretrain_greenmim_fmnist.py --workdir workdirs/fmnist_greenmim
    python -m prmim_jax.main --config configs/pretrain_greenmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/finetune_swin_fmnist.py --workdir workdirs/fmnist_greenmim_ft \\
        --config.init.workdir=workdirs/fmnist_greenmim     # fine-tune the pretrained Swin

The Swin is ``finetune_swin_fmnist.py``'s (patch 2 on 28 x 28: a 14 x 14 grid, stage 0 in 2 x 2 shifted
windows of 7, stage 1 one 7 x 7 window; width 64, depths 2-6, heads 2-4), so a run fine-tunes with that
config. Its last stage's tokens are 4-pixel mask units on a 7 x 7 unit grid, the grid GreenMIM's 32-pixel
units give at 224: 12 of 49 units visible at ratio 0.75, and at rho_d = 0.5 (Table 5; a fraction of all
units) 24 of the 37 masked units thrown. GreenMIM's decoder (one block; width 128 here) predicts each unit's 4 x 4 pixels, norm-pix.
Argument: ``reconstruction=full|partial|progressive``, ``sampler=``, ``throw=``, ``kernel=K`` (the
aggregation's, 7 by default), ``steps=N``, ``seed=N``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import greenmim as greenmim_method
from prmim_jax.models import greenmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS, kernel=int)
    model = greenmim.model_config(
        "T",
        width=64,
        depths=(2, 6),
        num_heads=(2, 4),
        patch_size=2,
        window_size=7,
        image_size=28,
        channels=1,
        decoder_width=128,
        decoder_depth=1,
        decoder_num_heads=4,
    )
    overrides = common.throwing(options)
    if options.kernel is not None:
        overrides["kernel_size"] = options.kernel
    return common.fmnist_pretraining(options, model=model, method=greenmim_method.default_config(**overrides))
