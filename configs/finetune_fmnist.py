"""Fine-tuning the Fashion-MNIST pretraining (``configs/pretrain_fmnist.py``).

    python -m prmim_jax.main --config configs/finetune_fmnist.py --workdir workdirs/fmnist_ft \\
        --config.init.workdir=workdirs/fmnist
    python -m prmim_jax.main --config configs/finetune_fmnist.py:blocks=1 ...   # partial fine-tuning
    python -m prmim_jax.main --config configs/finetune_fmnist.py:recipe=table14 ...   # the paper's recipe

Argument: comma-separated ``recipe=fmnist|table14``, ``size=small`` (the
ablation's width-64 model), ``blocks=k`` (only the last k blocks train),
``steps=N``, ``seed=N``, ``short`` (the ablation's 60-step fine-tune), ``runlocal``.
Without ``--config.init.workdir`` the classifier trains from scratch.

``recipe=fmnist`` (the default) is the recipe measured to reach 90% test top-1
from the main job's encoder on a 2-core CPU (``benchmarks/results/main_job_cpu.md``
has the run): AdamW at base lr 3e-3 with layer-wise decay 0.9, batch 64, 4000
steps (4.3 epochs) with a tenth of warm-up and cosine, whole images flipped at
random, label smoothing 0.1, no drop path, and a BatchNorm without affine before
the linear head. ``recipe=table14`` is the paper's (AdamW, layer decay 0.75, drop
path 0.1, RandAug (9, 0.5), random erasing 0.25, mixup 0.8 / cutmix 1.0, crops
down to 8% of the image): made for 100 epochs of ImageNet, it stays far below
that after the steps a CPU gives, since crops of 8% of a 28 x 28 image and mixed
labels need many more.

Why the BatchNorm: after a short pretraining the mean-pooled tokens carry large
per-dimension offsets common to all images, large against their spread across
images, so ``fc_norm``'s output varies little between
images and a linear head from Table 14's 2e-5 init needs thousands of steps to
separate classes. Standardising each feature over the batch, as MAE's linear
probe does, lets the head learn from the first steps. ``short`` (no RandAug,
erasing or mixing, crops of at least 35% of the image, 60 steps of 128 in the
ablation) uses it too, with ``table14``'s other settings.
"""

from configs import common
from prmim_jax import optim
from prmim_jax.data import schema
from prmim_jax.methods import classify
from prmim_jax.models import classifier

RECIPES = ("fmnist", "table14")


def get_config(arg=None):
    options = common.parse_arg(
        arg, recipe="fmnist", size="", blocks=int, steps=int, seed=0, short=False, runlocal=False
    )
    if options.recipe not in RECIPES:
        raise ValueError(f"recipe={options.recipe!r}; choose one of {RECIPES}.")
    if options.size not in ("", "small"):
        raise ValueError(f"size={options.size!r}; the only other size is 'small'.")
    paper = options.recipe == "table14" or options.short
    # Table 14's augmentations: RandAug, random erasing, mixup and cutmix ('short' turns them off).
    augmented = options.recipe == "table14" and not options.short
    total_steps = options.steps or (500 if paper else 4000)
    # The encoder of configs/pretrain_fmnist.py: patch 2 on 28 x 28 gives the 14 x 14 grid.
    model = classifier.classifier_config(
        "Ti/2",
        width=64 if options.size == "small" else 128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        num_classes=10,
        drop_path_rate=0.1 if paper else 0.0,
        trainable_blocks=options.blocks,
    )
    if not augmented:
        model.update(head="batchnorm_linear", head_init_std=0.01)
    if options.short:
        crops = dict(crop_scale=(0.35, 1.0))
    elif paper:
        crops = dict(crop_scale=(0.08, 1.0))
    else:
        crops = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    config = common.finetuning(
        seed=options.seed,
        batch_size=128 if paper else 64,
        total_steps=total_steps,
        model=model,
        optimizer=optim.classifier_optimizer_config(
            base_lr=1e-3 if paper else 3e-3,
            layer_decay=0.75 if paper else 0.9,
            warmup_steps=total_steps // 10,
            min_lr=1e-6,
        ),
        mixing=classify.mixing_config(
            **({} if augmented else dict(mixup_alpha=0.0, cutmix_alpha=0.0)), label_smoothing=0.1
        ),
        data=schema.data_config(
            source="fashion_mnist",
            **crops,
            rand_augment="rand-m9-mstd0.5-inc1" if augmented else None,
            random_erase_prob=0.25 if augmented else 0.0,
        ),
        accuracy=dict(every=0, batch_size=500),
        log_every=50 if paper else 100,
        checkpoint_every=250 if paper else 500,
    )
    if options.runlocal:
        common.run_fmnist_locally(config, options.steps)
    return config
