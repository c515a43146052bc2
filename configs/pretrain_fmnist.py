"""PR-MIM pretraining on Fashion-MNIST: the README's main job.

28x28 images with patch 2 give the 14x14 token grid of ViT-B/16 at 224, so the
samplers and the aggregation see the paper's geometry. Furthest sampling,
rho_d = 0.5, a small ViT (width 128, depth 4) sized to finish in about 10 minutes on 2 CPU cores.

    python -m prmim_jax.main --config configs/pretrain_fmnist.py --workdir workdirs/fmnist
    python -m prmim_jax.main --config configs/pretrain_fmnist.py:runlocal --workdir /tmp/fmnist_smoke

The argument is a comma-separated list: ``runlocal`` (a one-minute run),
``method=mae|partial|prmim``, ``sampler=...``, ``throw=0.25``, ``steps=N``,
``seed=N`` (model initialisation and the data pipeline: order, crops, token sets) and
``size=small`` (width 64, decoder 64 x 2: the ablation's model, ``benchmarks/ablation_fmnist.py``).
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
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
    if options.get("size") == "small":
        config.model.update(width=64, num_heads=4, decoder_width=64, decoder_num_heads=4)
    elif "size" in options:
        raise ValueError(f"size={options['size']!r}; the only other size is 'small'.")
    config.method = config_args.method(options)
    config.optimizer = optim.optimizer_config(base_lr=1.5e-3, warmup_steps=config.total_steps // 10, weight_decay=0.05)
    config.data = pipeline.data_config(source="fashion_mnist")
    config.sharding = sharding.sharding_config()
    config.evals.knn.update(every=0, k=20, train_examples=5000, test_examples=2000, batch_size=512)
    config.log_every = 50
    config.checkpoint_every = 250
    config.evals.reconstruction = eval_config("reconstruction", every=250)
    if options.get("runlocal"):
        config.total_steps = int(options.get("steps", 40))
        config.batch_size = 64
        config.optimizer.warmup_steps = 5
        config.log_every = 10
        config.checkpoint_every = 20
        config.evals.reconstruction.every = 20
        config.evals.knn.update(train_examples=1000, test_examples=500)
    return config
