"""PR-MIM pretraining of ViT-B/16 on ImageNet-1K: the paper's Table 13.

    python -m prmim_jax.main --config configs/pretrain_in1k.py --workdir gs://BUCKET/prmim_b16_e100
    python -m prmim_jax.main --config configs/pretrain_in1k.py:epochs=800,model=L/16 --workdir ...
    python -m prmim_jax.main --config configs/pretrain_in1k.py:runlocal --workdir /tmp/in1k_smoke

Reads TFDS's ``imagenet2012`` (ArrayRecord form) through ``tfds.data_source``;
point ``--config.data.data_dir`` at the prepared dataset. Argument: a comma-
separated list of ``epochs=100|300|800``, ``model=B/16|L/16``,
``method=mae|partial|prmim``, ``sampler=...``, ``throw=0.5``, ``fsdp`` (shard
parameters and optimizer state over all devices), ``runlocal``.
"""

from configs import common
from prmim_jax import methods
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, model="B/16", method="prmim", sampler=str, throw=float)
    # Table 13: AdamW (0.9, 0.95), base lr 1.5e-4 (x 4096 / 256 = 2.4e-3), wd 0.05, 40 warmup epochs, cosine.
    return common.in1k_pretraining(
        options,
        model=mae.model_config(options.model, image_size=224, channels=3, dtype="bfloat16"),
        runlocal_model=mae.model_config("Ti/16", image_size=224, channels=3, decoder_depth=1),
        method=methods.method_config(options.method, **common.throwing(options)),
        batch_size=4096,
        epochs=100,
        warmup_epochs=40,
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05),
    )
