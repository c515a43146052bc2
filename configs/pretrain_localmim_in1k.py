"""LocalMIM (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py --workdir gs://BUCKET/localmim_b16_e100
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:epochs=1600 --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:runlocal --workdir /tmp/localmim_smoke

The official ViT-B recipe (Haoqing-Wang/LocalMIM, ``ViT/README.md``:
``--batch_size 256`` on 8 GPUs, ``--blr 2e-4 --weight_decay 0.05
--mask_ratio 0.75 --hog_nbins 9``; ``run_pretrain.py``: AdamW (0.9, 0.95),
``min_lr`` 1e-6, half-cycle cosine, random resized crops of scale (0.2, 1)
and flips; timm 0.3.2's ``add_weight_decay``: every parameter of two or more
dimensions is decayed): batch 2048, lr 2e-4 per 256 images, levels at blocks 2, 4, 10,
12 with heads at scales 4 / 2 / 1 / 0.5 (HOG cells of 4 / 8 / 16 / 32
pixels, 9 bins), decoders of width 256, one block, 8 heads. 100 epochs
with 10 warmup epochs (the official setting for 100 epochs, the paper's
Table 4 schedule); ``epochs=1600`` is the released model's schedule (40
warmup epochs). PR-MIM at the paper's rho_d = 0.65 with furthest sampling.
Argument: ``epochs=100|1600``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.65``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import localmim as localmim_method
from prmim_jax.models import localmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS)
    config = common.in1k_pretraining(
        options,
        model=localmim.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
        method=localmim_method.default_config(**common.throwing(options)),
        batch_size=2048,
        epochs=100,
        warmup_epochs=10 if (options.epochs or 100) <= 100 else 40,
        optimizer=dict(base_lr=2e-4, min_lr=1e-6, weight_decay=0.05, no_decay=common.ONE_DIMENSIONAL),
        pictures=False,
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT, tap_blocks=(1, 2), scales=(1.0, 0.5), decoder_width=16)
        config.model.decoder_num_heads = 2
    return config
