"""MFF (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py --workdir gs://BUCKET/mff_b16_e800
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_mff_in1k.py:runlocal --workdir /tmp/mff_smoke

mmpretrain's ``mff_vit-base-p16_8xb512-amp-coslr-800e_in1k``: MAE's ViT-B/16
recipe (decoder 512 x 8, mask ratio 0.75, norm-pix loss; AdamW (0.9, 0.95),
lr 1.5e-4 per 256 images at batch 4096, weight decay 0.05, 40 warmup epochs
then cosine; mixed precision) with the outputs of blocks 1, 3, 5, 7, 9 and 12
fused (``methods.mff``). PR-MIM at the paper's rho_d = 0.5 (Table 4). One
deviation: mmpretrain's MFF config augments with a resize to 224, a random
224 crop padded by 4 pixels (reflect) and a flip; our pipeline has MAE's
random resized crop (scale 0.2 to 1) and flip, which we keep. Argument:
``epochs=800|300``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.5``, ``fsdp``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import mff
from prmim_jax.models import mae

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.batch_size = 4096
    epochs = int(options.get("epochs", 800))
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.model = mae.model_config("B/16", image_size=224, channels=3, dtype="bfloat16")
    config.method = mff.default_config(
        reconstruction=options.get("reconstruction", "full"), **config_args.throwing(options)
    )
    config.optimizer = optim.optimizer_config(base_lr=1.5e-4, warmup_steps=40 * steps_per_epoch, weight_decay=0.05)
    config.data = pipeline.data_config(
        source="tfds", name="imagenet2012", split="train", eval_split="validation", num_workers=16
    )
    config.sharding = sharding.sharding_config(
        mesh=(("data", 1), ("fsdp", -1)) if options.get("fsdp") else (("data", -1), ("fsdp", 1))
    )
    config.evals.knn.update(
        every=10 * steps_per_epoch, k=20, train_examples=50000, test_examples=10000, batch_size=1024
    )
    config.evals.reconstruction = eval_config("reconstruction", every=5 * steps_per_epoch)
    config.log_every = 100
    config.checkpoint_every = 2 * steps_per_epoch
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model = mae.model_config("Ti/16", image_size=224, channels=3, decoder_depth=1)
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = config.evals.reconstruction.every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
