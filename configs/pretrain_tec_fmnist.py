"""TEC, TEC + partial reconstruction and TEC + PR-MIM on Fashion-MNIST, taught by one of our MAE runs.

    python -m prmim_jax.main --config configs/pretrain_fmnist.py:method=mae --workdir workdirs/fmnist_mae
    python -m prmim_jax.main --config configs/pretrain_tec_fmnist.py --workdir workdirs/tec_fmnist \\
        --config.method.teacher.workdir=workdirs/fmnist_mae
    python -m prmim_jax.main --config configs/pretrain_tec_fmnist.py:reconstruction=progressive --workdir ... \\
        --config.method.teacher.workdir=workdirs/fmnist_mae

The teacher is the encoder of a ``configs/pretrain_fmnist.py`` run (pretrain
it first, as above; validation says so when
``--config.method.teacher.workdir`` is missing); the student has its size
(28x28 images with patch 2: ViT-B/16's 14x14 token grid at 224; width 128,
depth 4), one adaptor group of its 4 blocks (depth // 3, as the official),
two decoders sharing 2 blocks of width 128. The official recipe for an MAE
teacher: features of its last 2 blocks, attention of the cls query and its
top 15 patches at temperature 1.8; ``pretrain_fmnist.py``'s schedule. PR-MIM
at the paper's rho_d = 0.5. Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``, ``throw=0.5``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.methods import tec
from prmim_jax.models import tec as tec_model


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 128
    config.total_steps = int(options.get("steps", 500))
    config.model = tec_model.model_config(
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
    config.method = tec.default_config(
        reconstruction=options.get("reconstruction", "full"),
        attention_top_k=15,
        attention_temperature=1.8,
        **config_args.throwing(options),
    )
    config.optimizer = optim.optimizer_config(base_lr=1.5e-3, warmup_steps=config.total_steps // 10, weight_decay=0.05)
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
