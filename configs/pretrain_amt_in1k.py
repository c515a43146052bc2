"""AMT's baselines of the paper's Table 6: MAE + AMT (400 epochs) and SimMIM + AMT (200 epochs) on ImageNet-1K.

    python -m prmim_jax.main --config configs/pretrain_amt_in1k.py --workdir gs://BUCKET/mae_amt_b16_e400
    python -m prmim_jax.main --config configs/pretrain_amt_in1k.py:framework=simmim --workdir gs://BUCKET/simmim_amt
    python -m prmim_jax.main --config configs/pretrain_amt_in1k.py:reconstruction=progressive ...  # AMT's tokens, PR-MIM
    python -m prmim_jax.main --config configs/pretrain_amt_in1k.py:runlocal --workdir /tmp/amt_smoke

guijiejie/AMT's code (``sampler='amt'``: each image's last-block cls attention, renewed every 40 epochs
after epoch 40, orders its tokens; ``prmim_jax.attention_maps``):

- ``framework=mae`` (``mae-AMT/``): MAE's recipe at batch 4096 for 400 epochs (``main_pretrain.py``
  defaults), lr 1.5e-4 per 256 images, 40 warmup epochs, AdamW (0.9, 0.95), weight decay 0.05 on every
  parameter of two or more dimensions; AMT's 45% masked-and-reconstructed and 40% thrown (its
  ``--mask_ratio 0.45 --throw_ratio 0.4``: the official README command leaves both at their argparse
  defaults, 0.75 and 0, which throw nothing) are our ``mask_ratio`` 0.846 (30 of 196 tokens visible, as
  AMT's ``int(L * 0.85)``) and ``throw_ratio`` 0.4 (78 thrown); epochs 0-40 mask 75% at random and throw
  nothing (``models_mae.py`` L207-210); no norm-pix loss (not in AMT's command).
- ``framework=simmim`` (``SimMIM-AMT/configs/vit_base/simmim_amt_pretrain__vit_base.yaml``): SimMIM's
  ViT-B/16 with a learned absolute position table and no relative bias, 200 epochs, lr 1e-4 per 512
  (5e-5 per 256), min lr 5e-6 per 512, cosine after 10 warmup epochs; 44% of the 32-pixel units masked
  and 26% thrown as whole units, both rounded up (``data/amtdatasets.py``: 22 and 13 of 49, our
  ``mask_ratio`` 0.70 and ``throw_ratio`` 0.26 with ``throw_granularity='unit'``); before epoch 40 44% at
  random, nothing thrown.

Argument: ``framework=mae|simmim``, ``reconstruction=partial|progressive`` (AMT's throwing is partial
reconstruction; progressive reconstructs AMT's thrown tokens as PR-MIM does), ``epochs=``, ``fsdp``,
``runlocal``.
"""

from configs import common
from prmim_jax.methods import mae as mae_method
from prmim_jax.methods import simmim as simmim_method
from prmim_jax.models import mae, simmim

# AMT's update schedule (mae-AMT main_pretrain.py: --loc_interval 40 --warmup_epochs 40; SimMIM-AMT's
# AMT_START_EPOCH 40).
AMT = dict(sampler="amt", amt_interval=40, amt_warmup_epochs=40)


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, framework="mae", reconstruction="partial")
    if options.framework == "mae":
        config = common.in1k_pretraining(
            options,
            model=mae.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
            method=mae_method.default_config(
                reconstruction=options.reconstruction,
                mask_ratio=0.846,
                throw_ratio=0.4,
                amt_warmup_mask_ratio=0.75,
                norm_pix_loss=False,
                **AMT,
            ),
            batch_size=4096,
            epochs=400,
            warmup_epochs=40,
            optimizer=dict(base_lr=1.5e-4, weight_decay=0.05, no_decay=common.ONE_DIMENSIONAL),
        )
        runlocal = dict(common.RUNLOCAL_VIT, **common.RUNLOCAL_DECODER)
    elif options.framework == "simmim":
        config = common.in1k_pretraining(
            options,
            model=simmim.model_config(
                "B/16",
                image_size=224,
                channels=3,
                dtype="bfloat16",
                position_embedding="learned",
                relative_position_bias="none",
            ),
            method=simmim_method.default_config(
                reconstruction=options.reconstruction,
                mask_ratio=0.70,
                throw_ratio=0.26,
                throw_granularity="unit",
                amt_warmup_mask_ratio=0.44,
                **AMT,
            ),
            batch_size=2048,
            epochs=200,
            warmup_epochs=10,
            optimizer=dict(
                base_lr=5e-5,
                b2=0.999,
                min_lr=5e-6 * 2048 / 512,
                weight_decay=0.05,
                grad_clip_norm=5.0,
                no_decay=(*common.ONE_DIMENSIONAL, "cls_token", "pos_embedding"),
            ),
            data=dict(crop_scale=(0.67, 1.0)),
        )
        runlocal = dict(common.RUNLOCAL_VIT)
    else:
        raise ValueError(f"framework={options.framework!r}; Table 6 has AMT on 'mae' and on 'simmim'.")
    if options.runlocal:
        common.run_locally(config, **runlocal)
        if options.framework == "simmim":
            config.method.mask_patch_size = 4
    return config
