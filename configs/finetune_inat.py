"""Fine-tuning a pretrained ViT on iNaturalist 2018 or 2019: the paper's Table 8.

    python -m prmim_jax.main --config configs/finetune_inat.py:dataset=inat2018,framework=mae --workdir ... \\
        --config.init.workdir=gs://BUCKET/prmim_b16_e800 --config.data.data_dir=gs://BUCKET/tfds
    python -m prmim_jax.main --config configs/finetune_inat.py:dataset=inat2019,framework=mff --workdir ... \\
        --config.init.workdir=...   # with ...:dataset=inat2019,framework=mff,path=/data/inat2019

"Most hyperparameters follow the settings used for ImageNet-1K, except the number of fine-tuning epochs set to
360" (the paper, Sec. 4.3): the framework's ImageNet-1K recipe (``finetune_in1k.RECIPES``) for 360 epochs of the
dataset's train split. iNaturalist 2018 is TFDS's ``i_naturalist2018`` (8142 classes, 437513 training images,
``validation`` scored); TFDS has no 2019 edition, so iNaturalist 2019 (1010 classes, 265213 training images) is
read as an image folder: ``train_val2019/`` sorted into ``train/<category_id>/`` and ``val/<category_id>/`` after
``train2019.json`` / ``val2019.json``, its root given as ``path=``. Argument: ``dataset=inat2018|inat2019``,
``path=`` (inat2019), ``framework=`` and ``model=`` as ``finetune_in1k.py``, ``epochs=N``, ``fsdp``, ``runlocal``.
"""

from configs import common, finetune_in1k
from prmim_jax.models import classifier

EPOCHS = 360
# Per dataset: (classes, training images, the data section's keys).
DATASETS = {
    "inat2018": (8142, 437_513, dict(source="tfds", name="i_naturalist2018", split="train", eval_split="validation")),
    "inat2019": (1010, 265_213, dict(source="image_folder", split="train", eval_split="val")),
}


def get_config(arg=None):
    options = common.parse_arg(
        arg, dataset="inat2018", path=str, framework="mae", model="B/16", epochs=int, fsdp=False, runlocal=False
    )
    if options.dataset not in DATASETS:
        raise ValueError(f"dataset={options.dataset!r}; Table 8 has {tuple(DATASETS)}.")
    recipe = finetune_in1k.RECIPES.get((options.framework, options.model))
    if recipe is None:
        raise ValueError(
            f"framework={options.framework!r}, model={options.model!r} has no ImageNet-1K recipe to follow; choose "
            f"one of {sorted(finetune_in1k.RECIPES)}."
        )
    num_classes, train_images, data = DATASETS[options.dataset]
    if data["source"] == "image_folder":
        if not options.path and not options.runlocal:
            raise ValueError(
                f"dataset={options.dataset} is read from an image folder: give its root (holding train/ and val/), "
                f"e.g. configs/finetune_inat.py:dataset={options.dataset},path=/data/{options.dataset}."
            )
        data = data | {"path": options.path or "."}  # runlocal reads Fashion-MNIST instead
    tec = options.framework == "tec"
    model = classifier.classifier_config(
        options.model,
        image_size=224,
        channels=3,
        num_classes=num_classes,
        cls_token_mlp=tec,
        learned_pos_embedding=not tec,
        dtype="bfloat16",
    )
    options.epochs = options.epochs or EPOCHS
    config = common.imagenet_finetuning(options, recipe, model=model, train_images=train_images, data=data)
    if options.runlocal:
        common.run_locally(config, **common.RUNLOCAL_VIT)
    return config
