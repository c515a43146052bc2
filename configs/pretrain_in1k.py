"""MAE, MAE + partial reconstruction and MAE + PR-MIM on ImageNet-1K: the paper's Tables 2, 3, 11 and 12.

    python -m prmim_jax.main --config configs/pretrain_in1k.py --workdir gs://BUCKET/prmim_b16_e100
    python -m prmim_jax.main --config configs/pretrain_in1k.py:method=mae --workdir gs://BUCKET/mae_b16_e100
    python -m prmim_jax.main --config configs/pretrain_in1k.py:epochs=800,model=L/16 --workdir ...
    python -m prmim_jax.main --config configs/pretrain_in1k.py:throw=0.65,sampler=random_throw --workdir ...
    python -m prmim_jax.main --config configs/pretrain_in1k.py:runlocal --workdir /tmp/in1k_smoke

The official MAE recipe (facebookresearch/mae ``PRETRAIN.md``, ``main_pretrain.py``; the paper's
Table 13): batch 4096, AdamW (0.9, 0.95), base lr 1.5e-4 per 256 images, weight decay 0.05 on
every parameter of two or more dimensions (timm 0.3.2's ``add_weight_decay``: the cls and mask
tokens are decayed), 40 warmup epochs then a cosine to 0, RandomResizedCrop (0.2, 1) and flips,
mask ratio 0.75, the norm-pix loss, decoder 512 x 8 (16 heads), mixed precision (bfloat16).
``docs/recipes.md`` has every value with its source; ``python -m configs.rows`` the rows.

Reads TFDS's ``imagenet2012`` (ArrayRecord form) through ``tfds.data_source``; point
``--config.data.data_dir`` at the prepared dataset. Argument: ``epochs=100|300|800`` (100),
``model=B/16|L/16``, ``method=mae|partial|prmim`` (PR-MIM: furthest sampling, rho_d 0.5),
``sampler=``, ``throw=`` (rho_d), ``running_cell_decoder=masked|videomae`` (the running cell's decoder:
ours, or VideoMAE V2's official one, ``methods.mae``), ``aggregator=dwconv|transformer|convnext|avgpool``
and ``kernel=3..11`` (Tables 11-12), ``fsdp`` (shard parameters and optimizer state over all
devices), ``runlocal`` (a tiny model on Fashion-MNIST-sized data, seconds on a laptop).
"""

from configs import common
from prmim_jax import methods
from prmim_jax.models import mae


def get_config(arg=None):
    options = common.parse_arg(
        arg,
        **common.IN1K_ARGS,
        model="B/16",
        method="prmim",
        sampler=str,
        throw=float,
        running_cell_decoder=str,
        aggregator=str,
        kernel=int,
    )
    method = methods.method_config(options.method, **common.throwing(options))
    if options.running_cell_decoder is not None:
        method.running_cell_decoder = options.running_cell_decoder
    if options.aggregator is not None:
        method.aggregator = options.aggregator
    if options.kernel is not None:
        method.kernel_size = options.kernel
    config = common.in1k_pretraining(
        options,
        model=mae.model_config(options.model, image_size=224, channels=3, dtype="bfloat16"),
        method=method,
        batch_size=4096,
        epochs=100,
        warmup_epochs=40,
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05, no_decay=common.ONE_DIMENSIONAL),
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT, **common.RUNLOCAL_DECODER)
    return config
