"""Fine-tuning a pretrained ViT-B/16 or ViT-L/16 on ImageNet-1K: the paper's Table 14.

    python -m prmim_jax.main --config configs/finetune_in1k.py --workdir gs://BUCKET/ft_b16 \\
        --config.init.workdir=gs://BUCKET/prmim_b16_e100
    python -m prmim_jax.main --config configs/finetune_in1k.py:model=L/16 --workdir ... \\
        --config.init.mae_checkpoint=mae_pretrain_vit_large.pth
    python -m prmim_jax.main --config configs/finetune_in1k.py:blocks=4 --workdir ...   # partial fine-tuning

Argument: comma-separated ``model=B/16|L/16`` (Table 14's column), ``blocks=k``
(only the last k blocks train: the paper's Fig. 6), ``epochs=N``, ``fsdp``,
``runlocal`` (a tiny smoke run). Reads TFDS's ``imagenet2012`` through
``tfds.data_source``; set ``--config.data.data_dir``.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.methods import classify
from prmim_jax.models import classifier

# Table 14, per model: (base lr, layer decay, drop path, epochs).
RECIPES = {"B/16": (5e-4, 0.65, 0.1, 100), "L/16": (1e-3, 0.75, 0.2, 50)}


def get_config(arg=None):
    options = common.parse_arg(arg, model="B/16", blocks=int, epochs=int, fsdp=False, runlocal=False)
    if options.model not in RECIPES:
        raise ValueError(f"model={options.model!r}; Table 14 gives recipes for {sorted(RECIPES)}.")
    base_lr, layer_decay, drop_path, epochs = RECIPES[options.model]
    batch_size = 1024
    steps_per_epoch = common.IMAGENET_TRAIN_IMAGES // batch_size
    model = classifier.classifier_config(
        options.model,
        image_size=224,
        channels=3,
        num_classes=1000,
        drop_path_rate=drop_path,
        trainable_blocks=options.blocks,
        dtype="bfloat16",
    )
    config = common.finetuning(
        batch_size=batch_size,
        total_steps=(options.epochs or epochs) * steps_per_epoch,
        model=model,
        # AdamW (0.9, 0.999), wd 0.05, lr = base_lr * 1024 / 256, 5 warmup epochs, cosine to 1e-6.
        optimizer=optim.classifier_optimizer_config(
            base_lr=base_lr, layer_decay=layer_decay, warmup_steps=5 * steps_per_epoch, min_lr=1e-6
        ),
        # mixup 0.8, cutmix 1.0 (switch 0.5), label smoothing 0.1; RandAug (9, 0.5), reprob 0.25.
        mixing=classify.mixing_config(),
        data=common.imagenet_data(crop_scale=(0.08, 1.0), rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25),
        accuracy=dict(every=5 * steps_per_epoch, batch_size=1024),
        fsdp=options.fsdp,
        log_every=100,
        checkpoint_every=steps_per_epoch,
    )
    if options.runlocal:
        common.run_in1k_locally(config)
    return config
