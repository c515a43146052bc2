"""SimMIM (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py --workdir gs://BUCKET/simmim_b16_e800
    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py:epochs=100,reconstruction=progressive ...
    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py:runlocal --workdir /tmp/simmim_smoke

microsoft/SimMIM's ViT-B recipe: 224 px, 32-pixel mask units at ratio 0.6,
layer scale 0.1, one relative position bias shared by the blocks, no absolute
position embedding, drop path 0.1; AdamW (0.9, 0.999), lr 1e-4 per 512 images
(batch 2048), weight decay 0.05, gradient clipping 5, 10 warmup epochs;
random resized crops of scale (0.67, 1) and flips. PR-MIM at the paper's
rho_d = 0.30 (Table 4). One deviation: SimMIM decays the lr in steps (x0.1
at epoch 700 of 800); we decay it with a cosine, our only schedule.
Argument: ``epochs=100|800``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.3``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import simmim as simmim_method
from prmim_jax.models import simmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS)
    return common.in1k_pretraining(
        options,
        model=simmim.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
        runlocal_model=simmim.model_config("Ti/16", image_size=224, channels=3),
        method=simmim_method.default_config(**common.throwing(options)),
        batch_size=2048,
        epochs=800,
        warmup_epochs=10,
        optimizer=dict(base_lr=5e-5, b2=0.999, min_lr=5e-6, weight_decay=0.05, grad_clip_norm=5.0),
        data=dict(crop_scale=(0.67, 1.0)),
    )
