"""PR-MIM pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 13.

    python -m prmim_jax.main --config configs/pretrain_in1k.py --workdir gs://BUCKET/prmim_b16_e100
    python -m prmim_jax.main --config configs/pretrain_in1k.py:epochs=800,model=L/16 --workdir ...
    python -m prmim_jax.main --config configs/pretrain_in1k.py:runlocal --workdir /tmp/in1k_smoke

Reads TFDS's ``imagenet2012`` (ArrayRecord form) through ``tfds.data_source``;
point ``--config.data.data_dir`` at the prepared dataset. Argument: a comma-
separated list of ``epochs=100|300|800``, ``model=B/16|L/16``,
``method=mae|partial|prmim``, ``sampler=...``, ``throw=0.5``, ``fsdp`` (shard
parameters and optimizer state over all devices), ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.models import mae

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = 0
    config.batch_size = 4096
    epochs = int(options.get("epochs", 100))
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.model = mae.model_config(options.get("model", "B/16"), image_size=224, channels=3, dtype="bfloat16")
    config.method = config_args.method(options)
    # Table 13: AdamW (0.9, 0.95), base lr 1.5e-4 (x 4096 / 256 = 2.4e-3), wd 0.05, 40 warmup epochs, cosine.
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
    config.log_every = 100
    config.checkpoint_every = 2 * steps_per_epoch
    config.evals.reconstruction = eval_config("reconstruction", every=5 * steps_per_epoch)
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model = mae.model_config("Ti/16", image_size=224, channels=3, decoder_depth=1)
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = config.evals.reconstruction.every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
