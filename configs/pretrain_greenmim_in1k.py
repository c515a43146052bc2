"""GreenMIM (+ partial, + PR-MIM) pretraining of Swin-B / Swin-L on ImageNet-1K: the paper's Table 5 rows.

    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py --workdir gs://BUCKET/greenmim_swinb_e100
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:model=L --workdir ...
    python -m prmim_jax.main --config configs/pretrain_greenmim_in1k.py:runlocal --workdir /tmp/greenmim_smoke

LayneH/GreenMIM's recipe (``scripts/run_greenmim_swin_base.sh``, ``green_mim_swin_base_patch4_dec512b1``):
Swin-B, patch 4, window 7 (Swin-L: window 14, GreenMIM's ``..._large_patch4_win14``), no drop path; 32-pixel
mask units (7 x 7) at ratio 0.75; decoder 512 x 1 (16 heads) predicting 32 x 32 x 3 pixels per unit with
the norm-pix loss; AdamW (0.9, 0.95), lr 1.5e-4 per 256 images, weight decay 0.05, 40 warmup epochs then
cosine. Table 5 pretrains 100 epochs (default here) at batch 2048 (ours; GreenMIM's scripts use 586 x 8).
PR-MIM at the paper's rho_d = 0.5. Two deviations: GreenMIM shares one mask across a batch (we draw one per
image, as MAE does: ``models.greenmim``), and its LayerNorms use eps 1e-6 where ours keep the official
Swin's 1e-5. Argument: ``epochs=N``, ``model=B|L``, ``reconstruction=full|partial|progressive``,
``sampler=``, ``throw=``, ``fsdp``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import greenmim
from prmim_jax.models import greenmim as greenmim_model

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.batch_size = 2048
    epochs = int(options.get("epochs", 100))
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    variant = options.get("model", "B")
    if variant not in ("B", "L"):
        raise ValueError(f"model={variant!r}; Table 5 has Swin-B ('B') and Swin-L ('L').")
    config.model = greenmim_model.model_config(
        variant, window_size=7 if variant == "B" else 14, image_size=224, channels=3, dtype="bfloat16"
    )
    config.method = greenmim.default_config(
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
        config.model.update(width=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), dtype="float32")
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = config.evals.reconstruction.every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
