"""Fine-tuning a SimMIM ViT-B/16 on ImageNet-1K with SimMIM's recipe: Table 4's and Table 6's SimMIM rows.

    python -m prmim_jax.main --config configs/finetune_simmim_in1k.py --workdir gs://BUCKET/simmim_ft \\
        --config.init.workdir=gs://BUCKET/simmim_b16_e100
    python -m prmim_jax.main --config configs/finetune_simmim_in1k.py:recipe=amt --workdir ... \\
        --config.init.workdir=gs://BUCKET/simmim_amt_b16_e200   # Table 6's SimMIM+AMT

microsoft/SimMIM ``configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml``: BASE_LR 1.25e-3 and
MIN_LR 2.5e-7 per 512 images (``main_finetune.py`` L322-324), 20 warmup epochs of 100, layer decay 0.65, drop path
0.1, gradient clipping at 5.0 (``config.py`` L102), AdamW (0.9, 0.999), weight decay 0.05 except one-dimensional
parameters and the cls token (``optimizer.py`` L139-152: each block's relative position table is decayed), timm's
augmentation and mixing as MAE's fine-tuning. The encoder is SimMIM's ViT: layer scale (0.1 at init, loaded), no
absolute position table, a relative position table per block started from the pretrained shared one
(``utils.py`` L207-215), mean pooling with its own LayerNorm, the head at 0.02 x 0.001. The batch is 2048 (the
README's 16 GPUs x 128; the config leaves it to the launch).

``recipe=amt`` fine-tunes SimMIM-AMT's pretraining (``pretrain_amt_in1k.py:framework=simmim``) its own way
(guijiejie/AMT ``SimMIM-AMT/configs/vit_base/simmim_finetune__vit_base.yaml``): a learned absolute position table,
no relative one, and the cls token after the final norm. Argument: ``recipe=simmim|amt``, ``blocks=k``,
``epochs=N``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.models import classifier

BATCH_SIZE = 2048
PER_512 = 512 / 256  # SimMIM's learning rates are per 512 images; ours per 256
RECIPE = common.FinetuningRecipe(
    base_lr=1.25e-3 / PER_512,
    layer_decay=0.65,
    drop_path=0.1,
    epochs=100,
    warmup_epochs=20,
    min_lr=2.5e-7 * BATCH_SIZE / 512,
    batch_size=BATCH_SIZE,
    grad_clip_norm=5.0,
    source="microsoft/SimMIM configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml",
)
# The encoder of each pretraining this config fine-tunes.
MODELS = {
    "simmim": dict(relative_position_bias="per_block", position_embedding="none", pool="avg"),
    "amt": dict(relative_position_bias="none", position_embedding="learned", pool="cls"),
}


def get_config(arg=None):
    options = common.parse_arg(arg, recipe="simmim", blocks=int, epochs=int, fsdp=False, runlocal=False)
    if options.recipe not in MODELS:
        raise ValueError(f"recipe={options.recipe!r}; choose one of {tuple(MODELS)}.")
    model = classifier.simmim_classifier_config(
        "B/16",
        image_size=224,
        channels=3,
        num_classes=1000,
        trainable_blocks=options.blocks,
        dtype="bfloat16",
        **MODELS[options.recipe],
    )
    config = common.imagenet_finetuning(
        options, RECIPE, model=model, no_decay=(optim.ONE_DIMENSIONAL, "cls_token", "pos_embedding")
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT)
    return config
