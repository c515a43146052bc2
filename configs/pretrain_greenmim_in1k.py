"""GreenMIM (+ partial, + PR-MIM) pretraining of Swin-B / Swin-L on ImageNet-1K: the paper's Table 5 rows.

    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py --workdir gs://BUCKET/greenmim_swinb_e100
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:model=L --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:runlocal --workdir /tmp/greenmim_smoke

LayneH/GreenMIM's recipe (``scripts/run_greenmim_swin_base.sh``, ``green_mim_swin_base_patch4_dec512b1``):
Swin-B, patch 4, window 7 (Swin-L: window 14, GreenMIM's ``..._large_patch4_win14``), no drop path; 32-pixel
mask units (7 x 7) at ratio 0.75; decoder 512 x 1 (16 heads) predicting 32 x 32 x 3 pixels per unit with
the norm-pix loss; AdamW (0.9, 0.95), lr 1.5e-4 per 256 images, weight decay 0.05, 40 warmup epochs then
cosine. Table 5 pretrains 100 epochs (default here) at batch 2048 (ours; GreenMIM's scripts use 586 x 8).
PR-MIM at the paper's rho_d = 0.5. Two deviations: GreenMIM shares one mask across a batch (we draw one per
image, as MAE does: ``models.greenmim``), and its LayerNorms use eps 1e-6 where ours keep the official
Swin's 1e-5. Argument: ``epochs=N``, ``model=B|L``, ``reconstruction=full|partial|progressive``,
``sampler=``, ``throw=``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import greenmim as greenmim_method
from prmim_jax.models import greenmim


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS, model="B")
    if options.model not in ("B", "L"):
        raise ValueError(f"model={options.model!r}; Table 5 has Swin-B ('B') and Swin-L ('L').")
    model = greenmim.model_config(
        options.model,
        window_size=7 if options.model == "B" else 14,
        image_size=224,
        channels=3,
        dtype="bfloat16",
    )
    runlocal_model = model.copy_and_resolve_references()
    runlocal_model.update(width=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), dtype="float32")
    return common.in1k_pretraining(
        options,
        model=model,
        runlocal_model=runlocal_model,
        method=greenmim_method.default_config(**common.throwing(options)),
        batch_size=2048,
        epochs=100,
        warmup_epochs=40,
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05),
    )
