"""MFF, MFF + partial reconstruction and MFF + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py --workdir workdirs/mff_fmnist
    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py:runlocal --workdir /tmp/mff_smoke

``configs/pretrain_fmnist.py``'s model and schedule (28x28 images with patch
2: ViT-B/16's 14x14 token grid at 224; width 128, depth 4, decoder 128 x 2),
with blocks 1 and 3 fused with block 4 (ViT-B fuses every other block below
the last). PR-MIM at the paper's rho_d = 0.5. Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``, ``throw=0.5``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import mff
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    model = mae.model_config(
        "Ti/2",
        width=128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        decoder_width=128,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    method = mff.default_config(fused_blocks=(1, 3), **common.throwing(options))
    return common.fmnist_pretraining(options, model=model, method=method)
