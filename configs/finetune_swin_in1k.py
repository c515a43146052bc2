"""Fine-tuning a GreenMIM Swin-B or Swin-L on ImageNet-1K: Table 5's rows.

    python -m prmim_jax.main --config configs/finetune_swin_in1k.py --workdir gs://BUCKET/greenmim_swinb_ft \\
        --config.init.workdir=gs://BUCKET/greenmim_swinb_e100
    python -m prmim_jax.main --config configs/finetune_swin_in1k.py:model=L --workdir ...

GreenMIM fine-tunes with SimMIM's Swin code (LayneH/GreenMIM ``README.md`` L82: batch 768 = 48 x 16) and its
``ft_configs/greenmim_finetune_swin_base_img224_win7.yaml`` / ``greenmim_finetune_swin_large_img224_win14.yaml``:
BASE_LR 1.25e-3 (B) / 1e-3 (L) and MIN_LR 2.5e-7 / 3.5e-7 per 512 images, 20 warmup epochs of 100, layer decay
0.9 / 0.8, drop path 0.1 / 0.3, window 7 / 14; SimMIM's ``config.py`` and ``optimizer.py``: gradient clipping at
5.0, AdamW (0.9, 0.999), weight decay 0.05 except one-dimensional parameters and the relative position tables,
timm's augmentation and mixing as MAE's fine-tuning; the Swin's final norm, mean pooling, head at trunc-normal
0.02. Argument: ``model=B|L``, ``epochs=N``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.models import classifier

BATCH_SIZE = 768
PER_512 = 512 / 256  # SimMIM's learning rates are per 512 images; ours per 256
SOURCE = "LayneH/GreenMIM README.md L82, ft_configs/greenmim_finetune_swin_{base_img224_win7,large_img224_win14}.yaml"
# Per Swin size: (window, recipe).
SIZES = {
    "B": (
        7,
        common.FinetuningRecipe(
            1.25e-3 / PER_512, 0.9, 0.1, 100, 20, 2.5e-7 * BATCH_SIZE / 512, SOURCE, BATCH_SIZE, grad_clip_norm=5.0
        ),
    ),
    "L": (
        14,
        common.FinetuningRecipe(
            1e-3 / PER_512, 0.8, 0.3, 100, 20, 3.5e-7 * BATCH_SIZE / 512, SOURCE, BATCH_SIZE, grad_clip_norm=5.0
        ),
    ),
}


def get_config(arg=None):
    options = common.parse_arg(arg, model="B", epochs=int, fsdp=False, runlocal=False)
    if options.model not in SIZES:
        raise ValueError(f"model={options.model!r}; Table 5 has Swin-B ('B') and Swin-L ('L').")
    window, recipe = SIZES[options.model]
    model = classifier.swin_classifier_config(
        options.model, window_size=window, image_size=224, channels=3, num_classes=1000, dtype="bfloat16"
    )
    config = common.imagenet_finetuning(
        options, recipe, model=model, no_decay=(optim.ONE_DIMENSIONAL, "relative_position_bias_table")
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_SWIN)
    return config
