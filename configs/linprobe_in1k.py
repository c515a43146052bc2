"""Linear probing of a pretrained ViT on ImageNet-1K: MAE's protocol.

    python -m prmim_jax.main --config configs/linprobe_in1k.py --workdir gs://BUCKET/lin_b16 \\
        --config.init.workdir=gs://BUCKET/prmim_b16_e100

The encoder is frozen (no gradient, no update); the cls token after the final
norm goes through a BatchNorm without affine parameters to a linear head.
LARS (momentum 0.9, no weight decay), base lr 0.1 x batch / 256 with batch
16384, 90 epochs with 10 warmup, cosine; crops and flips only. Argument:
``model=B/16|L/16``, ``epochs=N``, ``runlocal``.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.methods import classify
from prmim_jax.models import classifier


def get_config(arg=None):
    options = common.parse_arg(arg, model="B/16", epochs=90, runlocal=False)
    batch_size = 16384
    steps_per_epoch = common.IMAGENET_TRAIN_IMAGES // batch_size
    model = classifier.classifier_config(
        options.model,
        image_size=224,
        channels=3,
        num_classes=1000,
        pool="cls",
        head="batchnorm_linear",
        head_init_std=0.01,
        drop_path_rate=0.0,
        trainable_blocks=0,
        dtype="bfloat16",
    )
    config = common.finetuning(
        batch_size=batch_size,
        total_steps=options.epochs * steps_per_epoch,
        model=model,
        optimizer=optim.classifier_optimizer_config(
            name="lars",
            base_lr=0.1,
            weight_decay=0.0,
            warmup_steps=10 * steps_per_epoch,
            min_lr=0.0,
            layer_decay=1.0,
        ),
        mixing=classify.mixing_config(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0),
        data=common.imagenet_data(crop_scale=(0.08, 1.0)),
        accuracy=dict(every=10 * steps_per_epoch, batch_size=1024),
        log_every=20,
        checkpoint_every=steps_per_epoch,
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT)
    return config
