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

from configs import common
from prmim_jax.methods import tec as tec_method
from prmim_jax.models import tec


def get_config(arg=None):
    options = common.parse_arg(arg, **common.FMNIST_ARGS, **common.THROWING_ARGS)
    model = tec.model_config(
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
    method = tec_method.default_config(attention_top_k=15, attention_temperature=1.8, **common.throwing(options))
    return common.fmnist_pretraining(options, model=model, method=method, pictures=False)
