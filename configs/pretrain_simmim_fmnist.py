"""SimMIM, SimMIM + partial reconstruction and SimMIM + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py --workdir workdirs/simmim_fmnist
    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py:runlocal --workdir /tmp/simmim_smoke

28x28 images with patch 2 give ViT-B/16's 14x14 token grid at 224, and 4-pixel
mask units its 7x7 unit grid of 32-pixel units, so masking, throwing and the
aggregation see the paper's geometry. A small SimMIM ViT (width 128, depth 4,
layer scale 0.1, shared relative position bias). Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``, ``throw=0.3``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import simmim as simmim_method
from prmim_jax.models import simmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    model = simmim.model_config("Ti/2", width=128, depth=4, num_heads=4, image_size=28, channels=1, drop_path_rate=0.0)
    method = simmim_method.default_config(mask_patch_size=4, **common.throwing(options))
    # SimMIM's AdamW (0.9, 0.999), wd 0.05, clip 5; its lr 1e-4 per 512 images is 5e-5 per 256 (ours).
    optimizer = dict(base_lr=5e-4, b2=0.999, grad_clip_norm=5.0)
    return common.fmnist_pretraining(
        options, model=model, method=method, optimizer=optimizer, data=dict(crop_scale=(0.67, 1.0))
    )
