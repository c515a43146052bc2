"""Linear probing of the Fashion-MNIST pretraining (``configs/pretrain_fmnist.py``): MAE's protocol at this size.

    python -m prmim_jax.main --config configs/linprobe_fmnist.py --workdir workdirs/fmnist_lin \\
        --config.init.workdir=workdirs/fmnist

Frozen encoder, cls token, BatchNorm without affine, linear head, LARS
(base lr 0.1, no weight decay), crops and flips only. Argument: ``size=small``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding
from prmim_jax.data import pipeline
from prmim_jax.methods import classify
from prmim_jax.models import classifier


def get_config(arg=None):
    options = config_args.parse(arg)
    config = classify.experiment_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 256
    config.total_steps = int(options.get("steps", 500))
    small = options.get("size") == "small"
    if "size" in options and not small:
        raise ValueError(f"size={options['size']!r}; the only other size is 'small'.")
    config.model = classifier.classifier_config(
        "Ti/2",
        width=64 if small else 128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        num_classes=10,
        pool="cls",
        head="batchnorm_linear",
        head_init_std=0.01,
        drop_path_rate=0.0,
        trainable_blocks=0,
    )
    config.optimizer = optim.classifier_optimizer_config(
        name="lars", base_lr=0.1, weight_decay=0.0, warmup_steps=config.total_steps // 10, min_lr=0.0, layer_decay=1.0
    )
    config.mixing = classify.mixing_config(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    config.data = pipeline.data_config(source="fashion_mnist", crop_scale=(0.08, 1.0))
    config.sharding = sharding.sharding_config()
    config.evals.accuracy.update(every=0, batch_size=500)
    config.log_every = 50
    config.checkpoint_every = 250
    if options.get("runlocal"):
        config.total_steps = int(options.get("steps", 30))
        config.batch_size = 64
        config.optimizer.warmup_steps = 3
        config.log_every = config.checkpoint_every = 10
    return config
