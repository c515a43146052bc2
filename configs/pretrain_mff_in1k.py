"""MFF (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py --workdir gs://BUCKET/mff_b16_e800
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:runlocal --workdir /tmp/mff_smoke

mmpretrain's ``mff_vit-base-p16_8xb512-amp-coslr-800e_in1k``: MAE's ViT-B/16
recipe (decoder 512 x 8, mask ratio 0.75, norm-pix loss; AdamW (0.9, 0.95),
lr 1.5e-4 per 256 images at batch 4096, weight decay 0.05, 40 warmup epochs
then cosine; mixed precision) with the outputs of blocks 1, 3, 5, 7, 9 and 12
fused (``methods.mff``). PR-MIM at the paper's rho_d = 0.5 (Table 4). MFF's
augmentation replaces MAE's random resized crop: a resize of the shorter side
to 224, a random 224 crop padded by 4 pixels (reflect) and a flip
(``data.crop='resize_pad_crop'``; ``'random_resized'`` is MAE's, to compare).
Weight decay spares the LayerNorms, biases and tokens (mmpretrain's
``paramwise_cfg``); the fusion weights are decayed, as mmpretrain's. Argument:
``epochs=800|300``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.5``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import mff
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS)
    config = common.in1k_pretraining(
        options,
        model=mae.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
        method=mff.default_config(**common.throwing(options)),
        batch_size=4096,
        epochs=800,
        warmup_epochs=40,
        # mmpretrain's decay_mult 0 for names holding 'ln', 'bias', 'pos_embed', 'mask_token', 'cls_token'.
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05, no_decay=("bias", "scale", "mask_token", "cls_token")),
        data=dict(crop="resize_pad_crop", crop_padding=4),
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT, **common.RUNLOCAL_DECODER)
        config.method.fused_blocks = (1,)  # the tiny encoder's first block, with its last
    return config
