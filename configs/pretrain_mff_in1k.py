"""MFF (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py --workdir gs://BUCKET/mff_b16_e800
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:runlocal --workdir /tmp/mff_smoke

mmpretrain's ``mff_vit-base-p16_8xb512-amp-coslr-800e_in1k``: MAE's ViT-B/16
recipe (decoder 512 x 8, mask ratio 0.75, norm-pix loss; AdamW (0.9, 0.95),
lr 1.5e-4 per 256 images at batch 4096, weight decay 0.05, 40 warmup epochs
then cosine; mixed precision) with the outputs of blocks 1, 3, 5, 7, 9 and 12
fused (``methods.mff``). PR-MIM at the paper's rho_d = 0.5 (Table 4). One
deviation: mmpretrain's MFF config augments with a resize to 224, a random
224 crop padded by 4 pixels (reflect) and a flip; our pipeline has MAE's
random resized crop (scale 0.2 to 1) and flip, which we keep. Argument:
``epochs=800|300``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.5``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import mff
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS)
    return common.in1k_pretraining(
        options,
        model=mae.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
        runlocal_model=mae.model_config("Ti/16", image_size=224, channels=3, decoder_depth=1),
        method=mff.default_config(**common.throwing(options)),
        batch_size=4096,
        epochs=800,
        warmup_epochs=40,
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05),
    )
