"""MFF, MFF + partial reconstruction and MFF + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py --workdir workdirs/mff_fmnist
    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_mff_fmnist.py:runlocal --workdir /tmp/mff_smoke

``configs/pretrain_fmnist.py``'s model and schedule (28x28 images with patch
2: ViT-B/16's 14x14 token grid at 224; width 128, depth 4, decoder 128 x 2),
with blocks 1 and 3 fused with block 4 (ViT-B fuses every other block below
the last). PR-MIM at the paper's rho_d = 0.5. Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``, ``throw=0.5``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import mff
from prmim_jax.models import mae


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 128
    config.total_steps = int(options.get("steps", 500))
    config.model = mae.model_config(
        "Ti/2",
        width=128,
        depth=4,
        num_heads=4,
        image_size=28,
        channels=1,
        decoder_width=128,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    config.method = mff.default_config(
        reconstruction=options.get("reconstruction", "full"), fused_blocks=(1, 3), **config_args.throwing(options)
    )
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
        config.checkpoint_every = config.evals.reconstruction.every = 20
        config.evals.knn.update(train_examples=1000, test_examples=500)
    return config
