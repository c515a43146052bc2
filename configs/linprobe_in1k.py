"""Linear probing of a pretrained ViT on ImageNet-1K: MAE's protocol.

    python -m prmim_jax.main --config configs/linprobe_in1k.py --workdir gs://BUCKET/lin_b16 \\
        --config.init.workdir=gs://BUCKET/prmim_b16_e100

The encoder is frozen (no gradient, no update); the cls token after the final
norm goes through a BatchNorm without affine parameters to a linear head.
LARS (momentum 0.9, no weight decay), base lr 0.1 x batch / 256 with batch
16384, 90 epochs with 10 warmup, cosine; crops and flips only. Argument:
``model=B/16|L/16``, ``epochs=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding
from prmim_jax.data import pipeline
from prmim_jax.methods import classify
from prmim_jax.models import classifier

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = classify.experiment_config()
    config.batch_size = 16384
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = int(options.get("epochs", 90)) * steps_per_epoch
    config.model = classifier.classifier_config(
        options.get("model", "B/16"),
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
    config.optimizer = optim.classifier_optimizer_config(
        name="lars", base_lr=0.1, weight_decay=0.0, warmup_steps=10 * steps_per_epoch, min_lr=0.0, layer_decay=1.0
    )
    config.mixing = classify.mixing_config(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    config.data = pipeline.data_config(
        source="tfds",
        name="imagenet2012",
        split="train",
        eval_split="validation",
        crop_scale=(0.08, 1.0),
        num_workers=16,
    )
    config.sharding = sharding.sharding_config()
    config.evals.accuracy.update(every=10 * steps_per_epoch, batch_size=1024)
    config.log_every = 20
    config.checkpoint_every = steps_per_epoch
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model.update(variant="Ti/16")
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = 5
        config.evals.accuracy.update(every=0, batch_size=16)
    return config
