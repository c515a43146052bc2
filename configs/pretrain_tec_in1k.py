"""TEC (+ partial, + PR-MIM) pretraining of ViT-B/16 on ImageNet-1K with an iBOT teacher: the paper's Table 4 rows.

    python -m prmim_jax.main --config configs/pretrain_tec_in1k.py --workdir gs://BUCKET/tec_b16_e300 \\
        --config.method.teacher.checkpoint=/path/to/ibot_vitb16_checkpoint_teacher.pth
    python -m prmim_jax.main --config configs/pretrain_tec_in1k.py:reconstruction=progressive --workdir ... \\
        --config.method.teacher.checkpoint=...
    python -m prmim_jax.main --config configs/pretrain_tec_in1k.py:runlocal --workdir /tmp/tec_smoke \\
        --config.method.teacher.workdir=/tmp/in1k_smoke   # a pretrain_in1k.py:runlocal,method=mae run

sail-sg/TEC's 300-epoch ViT-B recipe with the iBOT ViT-B/16 teacher
(``--basemodel ibot1kbase --mlp_token --pred_att --topkatt 9 --att_tau 1.0
--last_layers 2``): student MAE ViT-B/16 with the input and feature adaptors,
two decoders sharing 2 blocks of width 512 (16 heads), mask ratio 0.75;
feature targets from the teacher's last 2 blocks, attention targets of the
cls query and its top 9 patches at temperature 1.0; AdamW (0.9, 0.95), lr
1.5e-4 per 256 images at batch 4096 (256 x 8 GPUs x 2 accumulation steps),
weight decay 0.05 on every parameter of two or more dimensions (timm 0.3.2's
``add_weight_decay``), 40 warmup epochs then cosine; random resized crops
(0.2, 1) and flips; mixed precision. PR-MIM at the paper's rho_d = 0.5 (Table 4).

The teacher is the user's to give (it is not downloaded):
``--config.method.teacher.checkpoint=PATH`` for an official checkpoint
(iBOT, DINO, DeiT or MAE ViT-B/16 layout, ``.pth`` or ``.safetensors``) or
``--config.method.teacher.workdir=DIR`` for one of our runs; validation
stops with this instruction when neither is set. Argument:
``epochs=300|800``, ``teacher=ibot|mae`` (the official recipes' top-k and
temperature: 9 and 1.0, or 15 and 1.8), ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.5``, ``fsdp``, ``runlocal``.
"""

from configs import common
from prmim_jax.methods import tec as tec_method
from prmim_jax.models import tec

# The official recipes' attention targets for each base model: (top-k patch queries, temperature).
TEACHER_RECIPES = {"ibot": (9, 1.0), "mae": (15, 1.8)}


def get_config(arg=None):
    options = common.parse_arg(arg, **common.IN1K_ARGS, **common.THROWING_ARGS, teacher="ibot")
    if options.teacher not in TEACHER_RECIPES:
        raise ValueError(f"teacher={options.teacher!r}; choose one of {sorted(TEACHER_RECIPES)}.")
    top_k, temperature = TEACHER_RECIPES[options.teacher]
    method = tec_method.default_config(
        attention_top_k=top_k, attention_temperature=temperature, **common.throwing(options)
    )
    config = common.in1k_pretraining(
        options,
        model=tec.model_config("B/16", image_size=224, channels=3, dtype="bfloat16"),
        method=method,
        batch_size=4096,
        epochs=300,
        warmup_epochs=40,
        optimizer=dict(base_lr=1.5e-4, weight_decay=0.05, no_decay=common.ONE_DIMENSIONAL),
        pictures=False,
    )
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT, **common.RUNLOCAL_DECODER)
        config.method.attention_top_k = 5  # of the 196 patches of the tiny grid
    return config
