"""The classifier that fine-tuning, partial fine-tuning and linear probing train on a pretrained encoder.

Three backbones (``model.architecture``): the ViT (``classifier_config``), SimMIM's ViT
(``simmim_classifier_config``: layer scale, a relative position table per block) and the
Swin Transformer (``swin_classifier_config``, ``models.swin``). The parameters are
``{"encoder": <the encoder's parameters>, ["fc_norm": ...,] "head": ...}``, so a
pretrained encoder drops in as ``params["encoder"]``. The ViT has two readouts, as in MAE:

- ``pool="avg"`` (fine-tuning): the mean of the patch tokens, then a LayerNorm
  (``fc_norm``); the encoder's own final norm is not applied.
- ``pool="cls"`` (linear probing): the cls token after the encoder's final norm.

A Swin has one, the official Swin's: its final norm, then the mean over tokens
(``SwinOutput.pooled``; ``pool="avg"``, no ``fc_norm``).

``head="batchnorm_linear"`` puts a BatchNorm without affine parameters before
the linear head (MAE's linear probe); it keeps running statistics in the
``batch_stats`` collection.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from prmim_jax.models import layers, simmim, swin, vit

POOLS = ("avg", "cls")
HEADS = ("linear", "batchnorm_linear")
ARCHITECTURES = ("vit", "simmim_vit", "swin")
# How an encoder of each family fine-tunes: the model section's architecture, where the section starts, and the
# ImageNet-1K config that does it (what a message about a pretraining of that family names).
FINETUNING_HINTS = {
    "vit": "model.architecture='vit' (classifier.classifier_config; ImageNet-1K: configs/finetune_in1k.py)",
    "simmim_vit": (
        "model.architecture='simmim_vit' (classifier.simmim_classifier_config; ImageNet-1K: "
        "configs/finetune_simmim_in1k.py)"
    ),
    "swin": "model.architecture='swin' (classifier.swin_classifier_config; ImageNet-1K: configs/finetune_swin_in1k.py)",
}


class Classifier(nn.Module):
    """``images [B, H, W, C] -> logits [B, num_classes] float32``.

    ``train`` turns on drop path (needs the ``'dropout'`` rng) and batch
    statistics in the BatchNorm head (``mutable=["batch_stats"]``).
    """

    encoder: vit.Encoder | swin.SwinTransformer
    num_classes: int
    pool: str = "avg"
    head: str = "linear"
    head_init_std: float = 2e-5

    @nn.compact
    def __call__(self, images, train: bool = False):
        encoded = self.encoder.features(images, deterministic=not train)
        if self.pool == "cls":
            features = encoded.cls
        elif self.encoder.tokens_normalized:
            features = encoded.pooled  # the encoder pools its normalised tokens itself (a Swin: final norm, mean)
        else:
            # MAE's mean pooling: the float32 mean of the un-normalised tokens, then its own LayerNorm (float32 head).
            features = layers.layer_norm(jnp.float32, "fc_norm")(encoded.pooled)
        features = features.astype(jnp.float32)
        if self.head == "batchnorm_linear":
            features = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,  # PyTorch's BatchNorm momentum 0.1
                epsilon=1e-6,
                use_bias=False,
                use_scale=False,
                name="head_norm",
            )(features)
        return nn.Dense(
            self.num_classes,
            kernel_init=layers.logical(nn.initializers.truncated_normal(self.head_init_std), "embed", "classes"),
            bias_init=layers.logical(nn.initializers.zeros, "classes"),
            name="head",
        )(features)


def classifier_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section of a fine-tuning config (MAE's fine-tuning defaults).

    Keys: ``architecture`` (``'vit'``; ``swin_classifier_config`` for a Swin),
    ``variant`` and the size overrides of ``mae.model_config`` (``width``,
    ``depth``, ``num_heads``, ``patch_size``, ``mlp_ratio``), ``image_size``,
    ``channels``, ``num_classes``, ``pool``, ``head``, ``head_init_std``
    (2e-5 fine-tuning, 0.01 linear probe), ``drop_path_rate``,
    ``trainable_blocks`` (None: all; k: only the last k blocks, the final
    norms and the head train; 0: the head only), ``dtype`` (compute dtype;
    parameters, ``fc_norm``, head and logits stay float32), ``attention_impl``
    (``attention.attention_implementation``), ``remat`` (``vit.remat_block``).
    """
    config = vit.backbone_config(
        variant,
        architecture="vit",
        num_classes=1000,
        pool="avg",
        head="linear",
        head_init_std=2e-5,
        drop_path_rate=0.1,
        trainable_blocks=config_dict.placeholder(int),
        cls_token_mlp=False,
        learned_pos_embedding=True,
    )
    config.update(overrides)
    return config


def simmim_classifier_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
    """The model section of a SimMIM ViT fine-tuning config, SimMIM's own (microsoft/SimMIM
    ``configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml``: ``USE_APE False``,
    ``USE_RPB True``, ``USE_SHARED_RPB False``, ``USE_MEAN_POOLING True``, ``DROP_PATH_RATE 0.1``;
    ``config.py`` ``INIT_VALUES 0.1``): ``classifier_config``'s keys with ``architecture='simmim_vit'``,
    ``layer_scale_init`` 0.1, ``relative_position_bias`` ``'per_block'`` (each block's table starts from the
    pretrained shared one), ``position_embedding`` ``'none'``; mean pooling with its own LayerNorm
    (``pool='avg'``); the head at trunc-normal 0.02 x 0.001 (``vision_transformer.py`` ``init_scale``)."""
    config = classifier_config(variant, architecture="simmim_vit", head_init_std=0.02 * 0.001, layer_scale_init=0.1)
    del config["cls_token_mlp"], config["learned_pos_embedding"]  # TEC's and MAE's, not SimMIM's
    config.update(relative_position_bias="per_block", position_embedding="none")
    config.update(overrides)
    return config


def swin_classifier_config(variant: str = "B", **overrides) -> ml_collections.ConfigDict:
    """The model section of a Swin fine-tuning config: ``swin.model_config``'s keys (``variant`` ``T|S|B|L``,
    ``width``, ``depths``, ``num_heads``, ``patch_size``, ``window_size``, ...) plus ``architecture='swin'``,
    ``num_classes``, ``pool`` (``'avg'`` only: the final norm, then the mean), ``head``, ``head_init_std``
    (0.02, the official Swin's head init)."""
    config = swin.model_config(variant, image_size=overrides.pop("image_size", 224))  # an int or an (h, w) pair
    config.update(architecture="swin", num_classes=1000, pool="avg", head="linear", head_init_std=0.02)
    config.update(overrides)
    return config


def architecture(config: ml_collections.ConfigDict) -> str:
    """``config.architecture`` (``'vit'`` for sections saved before the key existed); ``ValueError`` naming the
    choices for an unknown one."""
    name = config.get("architecture", "vit")
    if name not in ARCHITECTURES:
        raise ValueError(
            f"model.architecture={name!r} is not a backbone: choose one of {ARCHITECTURES} (start the model section "
            "from classifier.classifier_config, simmim_classifier_config or swin_classifier_config)."
        )
    return name


def model_defaults(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """Every key a model section of ``config``'s architecture has, with its default (what validation holds it to)."""
    defaults = {"vit": classifier_config, "simmim_vit": simmim_classifier_config, "swin": swin_classifier_config}
    return defaults["vit" if config is None else architecture(config)]()


def _check_head(config: ml_collections.ConfigDict) -> None:
    if config.pool not in POOLS:
        raise ValueError(f"pool={config.pool!r}; choose one of {POOLS}.")
    if config.head not in HEADS:
        raise ValueError(f"head={config.head!r}; choose one of {HEADS}.")
    if config.num_classes < 2:
        raise ValueError(f"num_classes={config.num_classes} must be at least 2.")
    if not 0.0 <= config.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={config.drop_path_rate} must lie in [0, 1).")


def build_classifier(config: ml_collections.ConfigDict) -> Classifier:
    """A ``Classifier`` from ``classifier_config`` or ``swin_classifier_config``; raises ``ValueError`` (with the
    fix) on impossible values."""
    _check_head(config)
    if architecture(config) == "swin":
        if config.pool != "avg":
            raise ValueError(
                f"pool={config.pool!r}: a Swin has no cls token; use pool='avg' (its final norm, then the mean)."
            )
        return Classifier(swin.build_swin(config), config.num_classes, "avg", config.head, config.head_init_std)
    depth = vit.encoder_size(config).depth
    trainable = depth if config.trainable_blocks is None else config.trainable_blocks
    if not 0 <= trainable <= depth:
        raise ValueError(f"trainable_blocks={config.trainable_blocks} must lie in [0, depth={depth}] (or be None).")
    options = dict(
        final_norm=config.pool == "cls", drop_path_rate=config.drop_path_rate, frozen_blocks=depth - trainable
    )
    if architecture(config) == "simmim_vit":
        encoder = simmim.build_encoder(config, **options)
    else:
        fields = vit.backbone_fields(config)
        del fields["channels"]  # the encoder reads any channels; the data section's are checked against the model's
        encoder = vit.Encoder(
            **fields,
            learned_pos_embedding=config.get("learned_pos_embedding", True),
            cls_token_mlp=config.get("cls_token_mlp", False),
            **options,
        )
    return Classifier(encoder, config.num_classes, config.pool, config.head, config.head_init_std)


def trainable_mask(params, depth: int, trainable_blocks: int | None):
    """A pytree of bools over classifier ``params``: True where the optimizer may change a parameter.

    Everything trains when ``trainable_blocks`` is None. Otherwise the last
    ``trainable_blocks`` encoder blocks, the encoder's final norm (when it has
    blocks to train) and everything outside the encoder (``fc_norm``, head).
    """

    def trains(path, _):
        names = layers.path_names(path)
        if trainable_blocks is None or names[0] != "encoder":
            return True
        if "transformer" not in names:
            return False  # patch embedding, cls token, position table
        block = next((n for n in names if n.startswith("block_")), None)
        if block is None:
            return trainable_blocks > 0  # the final norm
        return int(block.removeprefix("block_")) >= depth - trainable_blocks

    return jax.tree_util.tree_map_with_path(trains, params)


def layer_ids(params, depth: int, encoder_layer_id=None):
    """Each parameter's layer for layer-wise lr decay of a classifier: ``encoder_layer_id(names)`` for the encoder's
    parameters (their path below ``encoder``; default ``vit.layer_id``: 0 embeddings, ``i + 1`` block ``i``),
    ``depth + 1`` for the rest (norms and head)."""
    encoder_layer_id = encoder_layer_id or functools.partial(vit.layer_id, depth=depth)

    def layer(path, _):
        names = layers.path_names(path)
        return encoder_layer_id(names[1:]) if names[0] == "encoder" else depth + 1

    return jax.tree_util.tree_map_with_path(layer, params)


def lr_layers(model: Classifier):
    """``(depth, layer_ids_fn)`` for layer-wise lr decay of ``model``: the blocks counted (the head is layer
    ``depth + 1``) and ``params -> a pytree of int layers``, numbered by the encoder (``layer_id``)."""
    encoder = model.encoder
    return encoder.depth, functools.partial(layer_ids, depth=encoder.depth, encoder_layer_id=encoder.layer_id)
