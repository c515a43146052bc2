"""SimMIM (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py --workdir gs://BUCKET/simmim_b16_e800
    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py:epochs=100,reconstruction=progressive ...
    python -m prmim_jax.main --config configs/pretrain_simmim_in1k.py:runlocal --workdir /tmp/simmim_smoke

microsoft/SimMIM's ViT-B recipe: 224 px, 32-pixel mask units at ratio 0.6,
layer scale 0.1, one relative position bias shared by the blocks, no absolute
position embedding, drop path 0.1; AdamW (0.9, 0.999), lr 1e-4 per 512 images
(batch 2048), weight decay 0.05, gradient clipping 5, 10 warmup epochs;
random resized crops of scale (0.67, 1) and flips. PR-MIM at the paper's
rho_d = 0.30 (Table 4). One deviation: SimMIM decays the lr in steps (x0.1
at epoch 700 of 800); we decay it with a cosine, our only schedule.
Argument: ``epochs=100|800``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.3``, ``fsdp``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import simmim
from prmim_jax.models import simmim as simmim_model

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.batch_size = 2048
    epochs = int(options.get("epochs", 800))
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.model = simmim_model.model_config("B/16", image_size=224, channels=3, dtype="bfloat16")
    config.method = simmim.default_config(
        reconstruction=options.get("reconstruction", "full"), **config_args.throwing(options)
    )
    config.optimizer = optim.optimizer_config(
        base_lr=5e-5, b2=0.999, min_lr=5e-6, warmup_steps=10 * steps_per_epoch, weight_decay=0.05, grad_clip_norm=5.0
    )
    config.data = pipeline.data_config(
        source="tfds",
        name="imagenet2012",
        split="train",
        eval_split="validation",
        crop_scale=(0.67, 1.0),
        num_workers=16,
    )
    config.sharding = sharding.sharding_config(
        mesh=(("data", 1), ("fsdp", -1)) if options.get("fsdp") else (("data", -1), ("fsdp", 1))
    )
    config.evals.knn.update(every=10 * steps_per_epoch, train_examples=50000, test_examples=10000, batch_size=1024)
    config.evals.reconstruction = eval_config("reconstruction", every=5 * steps_per_epoch)
    config.log_every = 100
    config.checkpoint_every = 2 * steps_per_epoch
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model = simmim_model.model_config("Ti/16", image_size=224, channels=3)
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = config.evals.reconstruction.every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
