"""SimMIM, SimMIM + partial reconstruction and SimMIM + PR-MIM on Fashion-MNIST: the in1k recipe at this size.

    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py --workdir workdirs/simmim_fmnist
    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py:reconstruction=progressive --workdir ...
    python -m prmim_jax.main --config configs/pretrain_simmim_fmnist.py:runlocal --workdir /tmp/simmim_smoke

28x28 images with patch 2 give ViT-B/16's 14x14 token grid at 224, and 4-pixel
mask units its 7x7 unit grid of 32-pixel units, so masking, throwing and the
aggregation see the paper's geometry. A small SimMIM ViT (width 128, depth 4,
layer scale 0.1, shared relative position bias). Argument: comma-separated
``reconstruction=full|partial|progressive``, ``sampler=...``, ``throw=0.3``,
``steps=N``, ``seed=N``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import simmim
from prmim_jax.models import simmim as simmim_model


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.seed = int(options.get("seed", 0))
    config.batch_size = 128
    config.total_steps = int(options.get("steps", 500))
    config.model = simmim_model.model_config(
        "Ti/2", width=128, depth=4, num_heads=4, image_size=28, channels=1, drop_path_rate=0.0
    )
    config.method = simmim.default_config(
        reconstruction=options.get("reconstruction", "full"), mask_patch_size=4, **config_args.throwing(options)
    )
    # SimMIM's AdamW (0.9, 0.999), wd 0.05, clip 5; its lr 1e-4 per 512 images is 5e-5 per 256 (ours).
    config.optimizer = optim.optimizer_config(
        base_lr=5e-4, b2=0.999, warmup_steps=config.total_steps // 10, weight_decay=0.05, grad_clip_norm=5.0
    )
    config.data = pipeline.data_config(source="fashion_mnist", crop_scale=(0.67, 1.0))
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
