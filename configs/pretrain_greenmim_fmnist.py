"""GreenMIM (+ partial, + PR-MIM) pretraining of a small Swin on Fashion-MNIST: Table 5's setting at this scale.

    python -m prmim_jax.main --config configs/pretrain_greenmim_fmnist.py --workdir workdirs/fmnist_greenmim
    python -m prmim_jax.main --config configs/pretrain_greenmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/finetune_swin_fmnist.py --workdir workdirs/fmnist_greenmim_ft \\
        --config.init.workdir=workdirs/fmnist_greenmim     # fine-tune the pretrained Swin

The Swin is ``finetune_swin_fmnist.py``'s (patch 2 on 28 x 28: a 14 x 14 grid, stage 0 in 2 x 2 shifted
windows of 7, stage 1 one 7 x 7 window; width 64, depths 2-6, heads 2-4), so a run fine-tunes with that
config. Its last stage's tokens are 4-pixel mask units on a 7 x 7 unit grid, the grid GreenMIM's 32-pixel
units give at 224: 12 of 49 units visible at ratio 0.75, and at rho_d = 0.5 (Table 5; a fraction of all
units) 24 of the 37 masked units thrown. GreenMIM's decoder (one block; width 128 here) predicts each unit's 4 x 4 pixels, norm-pix.
Argument: ``reconstruction=full|partial|progressive``, ``sampler=``, ``throw=``, ``kernel=K`` (the
aggregation's, 7 by default), ``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import greenmim
from prmim_jax.models import greenmim as greenmim_model


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 128
    config.total_steps = int(options.get("steps", 500))
    config.model = greenmim_model.model_config(
        "T",
        width=64,
        depths=(2, 6),
        num_heads=(2, 4),
        patch_size=2,
        window_size=7,
        image_size=28,
        channels=1,
        decoder_width=128,
        decoder_depth=1,
        decoder_num_heads=4,
    )
    overrides = config_args.throwing(options)
    if "kernel" in options:
        overrides["kernel_size"] = int(options["kernel"])
    config.method = greenmim.default_config(reconstruction=options.get("reconstruction", "full"), **overrides)
    config.optimizer = optim.optimizer_config(base_lr=1.5e-3, warmup_steps=config.total_steps // 10, weight_decay=0.05)
    config.data = pipeline.data_config(source="fashion_mnist")
    config.sharding = sharding.sharding_config()
    config.evals.knn.update(every=0, k=20, train_examples=5000, test_examples=2000, batch_size=512)
    config.evals.reconstruction = eval_config("reconstruction", every=250)
    config.log_every = 50
    config.checkpoint_every = 250
    if options.get("runlocal"):
        config.total_steps = int(options.get("steps", 40))
        config.batch_size = 64
        config.optimizer.warmup_steps = 5
        config.log_every = 10
        config.checkpoint_every = 20
        config.evals.reconstruction.every = 20
        config.evals.knn.update(train_examples=1000, test_examples=500)
    return config
