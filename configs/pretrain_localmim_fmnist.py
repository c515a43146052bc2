"""LocalMIM, LocalMIM + partial reconstruction and LocalMIM + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py --workdir workdirs/localmim_fmnist
    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_localmim_fmnist.py:runlocal --workdir /tmp/localmim_smoke

``configs/pretrain_fmnist.py``'s encoder and schedule (28x28 images with
patch 2: ViT-B/16's 14x14 token grid at 224; width 128, depth 4). A level at
every block (1, 2, 3, 4: the lower two fine, the upper two coarse, as
ViT-B's 2, 4 and 10, 12), each with a one-block decoder of width 64 (half
the encoder's, as LocalMIM's 256 is a third of ViT-B's 768; 4 heads).

HOG cells scaled to the image: the image is 224 / 28 = 8 times smaller, so
ViT-B's 4 / 8 / 16 / 32-pixel cells become 0.5 / 1 / 2 / 4 pixels; half a
pixel cannot be a cell, so the finest is one pixel, and the heads are at
scales 2 / 2 / 1 / 0.5 (cells of 1 / 1 / 2 / 4 pixels, grids of 28 / 28 / 14
/ 7 cells). A one-pixel cell's histogram is the pixel's orientation bin, one
value per channel (9 values for a grey image). The learning rate is
``pretrain_fmnist.py``'s scaled as LocalMIM's recipe scales MAE's (2e-4
against 1.5e-4 per 256 images). PR-MIM at the paper's rho_d = 0.65
(Table 4), furthest sampling. Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``,
``throw=0.65``, ``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.methods import localmim
from prmim_jax.models import localmim as localmim_model


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 128
    config.total_steps = int(options.get("steps", 500))
    config.model = localmim_model.model_config(
        "Ti/2",
        width=128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        tap_blocks=(1, 2, 3, 4),
        scales=(2.0, 2.0, 1.0, 0.5),
        decoder_width=64,
        decoder_num_heads=4,
    )
    config.method = localmim.default_config(
        reconstruction=options.get("reconstruction", "full"), **config_args.throwing(options)
    )
    config.optimizer = optim.optimizer_config(base_lr=2e-3, warmup_steps=config.total_steps // 10, weight_decay=0.05)
    config.data = pipeline.data_config(source="fashion_mnist")
    config.sharding = sharding.sharding_config()
    config.evals.knn.update(every=0, k=20, train_examples=5000, test_examples=2000, batch_size=512)
    config.log_every = 50
    config.checkpoint_every = 250
    if options.get("runlocal"):
        config.total_steps = int(options.get("steps", 40))
        config.batch_size = 64
        config.optimizer.warmup_steps = 5
        config.log_every = 10
        config.checkpoint_every = 20
        config.evals.knn.update(train_examples=1000, test_examples=500)
    return config
