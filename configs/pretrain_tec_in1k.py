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
weight decay 0.05, 40 warmup epochs then cosine; random resized crops (0.2,
1) and flips; mixed precision. PR-MIM at the paper's rho_d = 0.5 (Table 4).

The teacher is the user's to give (it is not downloaded):
``--config.method.teacher.checkpoint=PATH`` for an official checkpoint
(iBOT, DINO, DeiT or MAE ViT-B/16 layout, ``.pth`` or ``.safetensors``) or
``--config.method.teacher.workdir=DIR`` for one of our runs; validation
stops with this instruction when neither is set. Argument:
``epochs=300|800``, ``teacher=ibot|mae`` (the official recipes' top-k and
temperature: 9 and 1.0, or 15 and 1.8), ``reconstruction=full|partial|progressive``,
``sampler=...``, ``throw=0.5``, ``fsdp``, ``runlocal``.
"""

from prmim_jax import config_args, optim, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.methods import tec
from prmim_jax.models import tec as tec_model

IMAGENET_TRAIN_IMAGES = 1_281_167
# The official recipes' attention targets for each base model: (top-k patch queries, temperature).
TEACHER_RECIPES = {"ibot": (9, 1.0), "mae": (15, 1.8)}


def get_config(arg=None):
    options = config_args.parse(arg)
    config = train.default_config()
    config.batch_size = 4096
    epochs = int(options.get("epochs", 300))
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.model = tec_model.model_config("B/16", image_size=224, channels=3, dtype="bfloat16")
    teacher = options.get("teacher", "ibot")
    if teacher not in TEACHER_RECIPES:
        raise ValueError(f"teacher={teacher!r}; choose one of {sorted(TEACHER_RECIPES)}.")
    top_k, temperature = TEACHER_RECIPES[teacher]
    config.method = tec.default_config(
        reconstruction=options.get("reconstruction", "full"),
        attention_top_k=top_k,
        attention_temperature=temperature,
        **config_args.throwing(options),
    )
    config.optimizer = optim.optimizer_config(base_lr=1.5e-4, warmup_steps=40 * steps_per_epoch, weight_decay=0.05)
    config.data = pipeline.data_config(
        source="tfds", name="imagenet2012", split="train", eval_split="validation", num_workers=16
    )
    config.sharding = sharding.sharding_config(
        mesh=(("data", 1), ("fsdp", -1)) if options.get("fsdp") else (("data", -1), ("fsdp", 1))
    )
    config.evals.knn.update(
        every=10 * steps_per_epoch, k=20, train_examples=50000, test_examples=10000, batch_size=1024
    )
    config.log_every = 100
    config.checkpoint_every = 2 * steps_per_epoch
    if options.get("runlocal"):
        config.batch_size = 16
        config.total_steps = 10
        config.optimizer.warmup_steps = 2
        config.model = tec_model.model_config("Ti/16", image_size=224, channels=3, decoder_depth=1)
        config.data.num_workers = 0
        config.log_every = config.checkpoint_every = 5
        config.evals.knn.update(every=0, train_examples=64, test_examples=32, batch_size=16)
    return config
