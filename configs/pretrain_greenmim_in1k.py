"""GreenMIM (+ partial, + PR-MIM) pretraining of Swin-B / Swin-L on ImageNet-1K: the paper's Table 5 rows.

    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py --workdir gs://BUCKET/greenmim_swinb_e100
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:model=L --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:runlocal --workdir /tmp/greenmim_smoke

LayneH/GreenMIM's recipe: Swin-B, patch 4, window 7 (``scripts/run_greenmim_swin_base.sh``,
``green_mim_swin_base_patch4_dec512b1``), Swin-L, window 14 (``scripts/run_greenmim_swin_large_win14.sh``);
no drop path; 32-pixel mask units (7 x 7) at ratio 0.75; decoder 512 x 1 (16 heads) predicting 32 x 32 x 3
pixels per unit with the norm-pix loss; every linear layer, the Swin's too, and the patch embedding
xavier-uniform (``modeling/base_green_models.py``: ``model.init='xavier'``); AdamW (0.9, 0.95), weight
decay 0.05 except on one-dimensional parameters, the relative position tables and the mask token
(``main_pretrain.py``'s skip list), lr 1.5e-4 (Swin-B, ``run_greenmim_swin_base.sh``; its
``srun_greenmim_swin_base.sh`` has 1.0e-4) or 1.0e-4 (Swin-L) per 256 images, 40 warmup epochs then
cosine. Table 5 pretrains 100 epochs (default here) at batch 2048 (Swin-L's script: 256 x 8; Swin-B's
586 x 8). PR-MIM at the paper's rho_d = 0.5. Two deviations: GreenMIM shares one mask across a batch (we
draw one per image, as MAE does: ``models.greenmim``), and its LayerNorms use eps 1e-6 where ours keep
the official Swin's 1e-5. Argument: ``epochs=N``, ``model=B|L``, ``reconstruction=full|partial|progressive``,
``sampler=``, ``throw=``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import greenmim as greenmim_method
from prmim_jax.models import greenmim

# Per Swin size: (window, base lr per 256 images), from GreenMIM's scripts.
SIZES = {"B": (7, 1.5e-4), "L": (14, 1.0e-4)}


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS, model="B")
    if options.model not in SIZES:
        raise ValueError(f"model={options.model!r}; Table 5 has Swin-B ('B') and Swin-L ('L').")
    window, base_lr = SIZES[options.model]
    config = common.in1k_pretraining(
        options,
        model=greenmim.model_config(options.model, window_size=window, image_size=224, channels=3, dtype="bfloat16"),
        method=greenmim_method.default_config(**common.throwing(options)),
        batch_size=2048,
        epochs=100,
        warmup_epochs=40,
        optimizer=dict(
            base_lr=base_lr,
            weight_decay=0.05,
            no_decay=(*common.ONE_DIMENSIONAL, "relative_position_bias_table", "mask_token"),
        ),
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_SWIN, **common.RUNLOCAL_DECODER)
    return config
