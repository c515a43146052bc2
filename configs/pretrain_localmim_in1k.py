"""LocalMIM (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py --workdir gs://BUCKET/localmim_b16_e100
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:epochs=1600 --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_in1k.py:runlocal --workdir /tmp/localmim_smoke

The official ViT-B recipe (Haoqing-Wang/LocalMIM, ``ViT/README.md``:
``--batch_size 256`` on 8 GPUs, ``--blr 2e-4 --weight_decay 0.05
--mask_ratio 0.75 --hog_nbins 9``; ``run_pretrain.py``: AdamW (0.9, 0.95),
``min_lr`` 1e-6, half-cycle cosine, random resized crops of scale (0.2, 1)
and flips): batch 2048, lr 2e-4 per 256 images, levels at blocks 2, 4, 10,
12 with heads at scales 4 / 2 / 1 / 0.5 (HOG cells of 4 / 8 / 16 / 32
pixels, 9 bins), decoders of width 256, one block, 8 heads. 100 epochs
with 10 warmup epochs (the official setting for 100 epochs, the paper's
Table 4 schedule); ``epochs=1600`` is the released model's schedule (40
warmup epochs). PR-MIM at the paper's rho_d = 0.65 with furthest sampling.
Argument: ``epochs=100|1600``, ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.65``, ``fsdp``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.methods import localmim
from prmim_jax.models import localmim as localmim_model

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = 0
    config.batch_size = 2048
    epochs = int(options.get("epochs", 100))
    warmup_epochs = 10 if epochs <= 100 else 40
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.model = localmim_model.model_config("B/16", image_size=224, channels=3, dtype="bfloat16")
    config.method = localmim.default_config(
        reconstruction=options.get("reconstruction", "full"), **config_args.throwing(options)
    )
    config.optimizer = optim.optimizer_config(
        base_lr=2e-4, min_lr=1e-6, warmup_steps=warmup_epochs * steps_per_epoch, weight_decay=0.05
    )
    config.data = pipeline.data_config(
        source="tfds", name="imagenet2012", split="train", eval_split="validation", num_workers=16
    )
    config.sharding = sharding.sharding_config(
        mesh=(("data", 1), ("fsdp", -1)) if options.get("fsdp") else (("data", -1), ("fsdp", 1))
    )
    config.evals.knn.update(every=10 * steps_per_epoch, train_examples=50000, test_examples=10000, batch_size=1024)
    config.log_every = 100
    config.checkpoint_every = 2 * steps_per_epoch
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model = localmim_model.model_config("Ti/16", image_size=224, channels=3, dtype="float32")
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
