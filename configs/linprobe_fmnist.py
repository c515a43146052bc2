"""Linear probing of the Fashion-MNIST pretraining (``configs/pretrain_fmnist.py``): MAE's protocol at this size.

    python -m prmim_jax.main --config configs/linprobe_fmnist.py --workdir workdirs/fmnist_lin \\
        --config.init.workdir=workdirs/fmnist

Frozen encoder, cls token, BatchNorm without affine, linear head, LARS
(base lr 0.1, no weight decay), crops and flips only. Argument: ``size=small``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.data import schema
from prmim_jax.methods import classify
from prmim_jax.models import classifier


def get_config(arg=None):
    options = common.parse_arg(arg, size="", steps=int, seed=0, runlocal=False)
    if options.size not in ("", "small"):
        raise ValueError(f"size={options.size!r}; the only other size is 'small'.")
    total_steps = options.steps or 500
    model = classifier.classifier_config(
        "Ti/2",
        width=64 if options.size == "small" else 128,
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
    config = common.finetuning(
        seed=options.seed,
        batch_size=256,
        total_steps=total_steps,
        model=model,
        optimizer=optim.classifier_optimizer_config(
            name="lars", base_lr=0.1, weight_decay=0.0, warmup_steps=total_steps // 10, min_lr=0.0, layer_decay=1.0
        ),
        mixing=classify.mixing_config(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0),
        data=schema.data_config(source="fashion_mnist", crop_scale=(0.08, 1.0)),
        accuracy=dict(every=0, batch_size=500),
        log_every=50,
        checkpoint_every=250,
    )
    if options.runlocal:
        common.run_fmnist_locally(config, options.steps)
    return config
