"""Fine-tuning a pretrained ViT on ImageNet-1K with its framework's official recipe: Tables 3, 4, 6 and 7 of
the paper, and its Fig. 6 (partial fine-tuning).

    python -m prmim_jax.main --config configs/finetune_in1k.py:framework=mae --workdir gs://BUCKET/ft_b16 \\
        --config.init.workdir=gs://BUCKET/prmim_b16_e100
    python -m prmim_jax.main --config configs/finetune_in1k.py:framework=mae,model=L/16 --workdir ... \\
        --config.init.checkpoint=mae_pretrain_vit_large.pth
    python -m prmim_jax.main --config configs/finetune_in1k.py:framework=mff,robustness --workdir ...   # Table 7
    python -m prmim_jax.main --config configs/finetune_in1k.py:blocks=2 --workdir ...   # Fig. 6

Argument: comma-separated ``framework=mae|localmim|tec|mff|amt`` (the pretraining's; SimMIM's ViT fine-tunes
with ``finetune_simmim_in1k.py``, GreenMIM's Swin with ``finetune_swin_in1k.py``), ``model=B/16|L/16`` (where
the framework publishes a recipe for it), ``blocks=k`` (only the last k blocks train), ``epochs=N``,
``robustness`` (Table 7's ImageNet-C/-A/-R/-Sketch at the end), ``fsdp``, ``runlocal`` (a run of seconds on
Fashion-MNIST with a tiny ViT, the size ``runlocal`` pretrainings have).

Every framework fine-tunes MAE's way (batch 1024, AdamW (0.9, 0.999), weight decay 0.05 except one-dimensional
parameters, the cls token and the position table, RandAugment (9, 0.5), random erasing 0.25, mixup 0.8 / cutmix
1.0, label smoothing 0.1, mean pooling with its own LayerNorm, head at trunc-normal 2e-5, cosine per step); what
differs is in ``RECIPES``. TEC fine-tunes with its input adaptor (``--mlp_token``) and a fixed sin-cos position
table (sail-sg/TEC ``models/models_vit.py`` L38, L49-51); TEC's released weights have the adaptor folded into the
cls token already, so fine-tune those with ``--config.model.cls_token_mlp=False``.
"""

from configs import common
from prmim_jax.models import classifier

R = common.FinetuningRecipe
RECIPES = {
    # facebookresearch/mae FINETUNE.md L66-77 (B), L84-92 (L); main_finetune.py L73 (min_lr), L76 (warmup 5).
    ("mae", "B/16"): R(5e-4, 0.65, 0.1, 100, 5, 1e-6, "facebookresearch/mae FINETUNE.md L66-77"),
    ("mae", "L/16"): R(1e-3, 0.75, 0.2, 50, 5, 1e-6, "facebookresearch/mae FINETUNE.md L84-92"),
    # Haoqing-Wang/LocalMIM ViT/README.md L39-41: absolute --lr 4e-3 at batch 1024 for the 100-epoch model
    # (1e-3 per 256), layer decay 0.75, min_lr 1e-6, 20 warmup epochs; ViT-L L45: --lr 3e-3, 5 warmup, 50 epochs.
    ("localmim", "B/16"): R(1e-3, 0.75, 0.1, 100, 20, 1e-6, "Haoqing-Wang/LocalMIM ViT/README.md L39-41"),
    ("localmim", "L/16"): R(7.5e-4, 0.75, 0.2, 50, 5, 1e-6, "Haoqing-Wang/LocalMIM ViT/README.md L45"),
    # sail-sg/TEC README.md L155-166: the 300-epoch iBOT-teacher model, blr 5e-4, layer decay 0.50, 5 warmup.
    ("tec", "B/16"): R(5e-4, 0.50, 0.1, 100, 5, 1e-6, "sail-sg/TEC README.md L155-166"),
    # open-mmlab/mmpretrain configs/mff/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py L45-112: lr 2e-3 at 1024.
    ("mff", "B/16"): R(
        5e-4,
        0.65,
        0.1,
        100,
        5,
        1e-6,
        "open-mmlab/mmpretrain configs/mff/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py",
    ),
    # guijiejie/AMT README.md L84-93 (mae-AMT): blr 1e-3, layer decay 0.75 (the MAE paper's raw-pixel recipe).
    ("amt", "B/16"): R(1e-3, 0.75, 0.1, 100, 5, 1e-6, "guijiejie/AMT README.md L84-93"),
}
FRAMEWORKS = tuple(dict.fromkeys(framework for framework, _ in RECIPES))


def get_config(arg=None):
    options = common.parse_arg(
        arg, framework="mae", model="B/16", blocks=int, epochs=int, robustness=False, fsdp=False, runlocal=False
    )
    if options.framework not in FRAMEWORKS:
        raise ValueError(
            f"framework={options.framework!r}: this config fine-tunes the ViTs of {FRAMEWORKS}; SimMIM's ViT "
            "fine-tunes with configs/finetune_simmim_in1k.py, GreenMIM's Swin with configs/finetune_swin_in1k.py."
        )
    recipe = RECIPES.get((options.framework, options.model))
    if recipe is None:
        models = [model for framework, model in RECIPES if framework == options.framework]
        raise ValueError(f"model={options.model!r}: {options.framework}'s fine-tuning recipes are for {models}.")
    tec = options.framework == "tec"
    model = classifier.classifier_config(
        options.model,
        image_size=224,
        channels=3,
        num_classes=1000,
        trainable_blocks=options.blocks,
        cls_token_mlp=tec,
        learned_pos_embedding=not tec,
        dtype="bfloat16",
    )
    config = common.imagenet_finetuning(options, recipe, model=model)
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT)
    return config
