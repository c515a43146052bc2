"""PR-MIM pretraining on Fashion-MNIST: the README's main job.

28x28 images with patch 2 give the 14x14 token grid of ViT-B/16 at 224, so the
samplers and the aggregation see the paper's geometry. Furthest sampling,
rho_d = 0.5, a small ViT (width 128, depth 4) sized to finish in minutes on 2 CPU cores (``benchmarks/results/main_job_cpu.md``).

    python -m prmim_jax.main --config configs/pretrain_fmnist.py --workdir workdirs/fmnist
    python -m prmim_jax.main --config configs/pretrain_fmnist.py:runlocal --workdir /tmp/fmnist_smoke

The argument is a comma-separated list: ``runlocal`` (a one-minute run),
``method=mae|partial|prmim``, ``sampler=...``, ``throw=0.25``, ``steps=N``,
``seed=N`` (model initialisation and the data pipeline: order, crops, token sets) and
``size=small`` (width 64, decoder 64 x 2: the ablation's model, ``benchmarks/ablation_fmnist.py``).
"""

from configs import common
from prmim_jax import methods
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, method="prmim", sampler=str, throw=float, size="")
    model = mae.model_config(
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
    if options.size == "small":
        model.update(width=64, num_heads=4, decoder_width=64, decoder_num_heads=4)
    elif options.size:
        raise ValueError(f"size={options.size!r}; the only other size is 'small'.")
    method = methods.method_config(options.method, **common.throwing(options))
    return common.fmnist_pretraining(options, model=model, method=method)
