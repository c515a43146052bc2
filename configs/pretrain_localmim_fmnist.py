"""LocalMIM, LocalMIM + partial reconstruction and LocalMIM + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py --workdir workdirs/localmim_fmnist
    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py:runlocal --workdir /tmp/localmim_smoke

``configs/pretrain_fmnist.py``'s encoder and schedule (28x28 images with
patch 2: ViT-B/16's 14x14 token grid at 224; width 128, depth 4). A level at
every block (1, 2, 3, 4: the lower two fine, the upper two coarse, as
ViT-B's 2, 4 and 10, 12), each with a one-block decoder of width 64 (half
the encoder's, as LocalMIM's 256 is a third of ViT-B's 768; 4 heads).

HOG cells scaled to the image: the image is 224 / 28 = 8 times smaller, so
ViT-B's 4 / 8 / 16 / 32-pixel cells become 0.5 / 1 / 2 / 4 pixels; half a
pixel cannot be a cell, so the finest is one pixel, and the heads are at
scales 2 / 2 / 1 / 0.5 (cells of 1 / 1 / 2 / 4 pixels, grids of 28 / 28 / 14
/ 7 cells). A one-pixel cell's histogram is the pixel's orientation bin, one
value per channel (9 values for a grey image). The learning rate is
``pretrain_fmnist.py``'s scaled as LocalMIM's recipe scales MAE's (2e-4
against 1.5e-4 per 256 images). PR-MIM at the paper's rho_d = 0.65
(Table 4), furthest sampling. Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``,
``throw=0.65``, ``steps=N``, ``seed=N``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import localmim as localmim_method
from prmim_jax.models import localmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    model = localmim.model_config(
        "Ti/2",
        width=128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        tap_blocks=(1, 2, 3, 4),
        scales=(2.0, 2.0, 1.0, 0.5),
        decoder_width=64,
        decoder_num_heads=4,
    )
    method = localmim_method.default_config(**common.throwing(options))
    return common.fmnist_pretraining(options, model=model, method=method, optimizer=dict(base_lr=2e-3), pictures=False)
