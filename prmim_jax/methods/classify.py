"""Fine-tuning, partial fine-tuning and linear probing as a method of the one trainer.

The classifier (``models.classifier``: a ViT, or a Swin with ``model.architecture='swin'``)
trains on a pretrained encoder from ``config.init`` (at most one of):

- ``init.workdir``: a prmim_jax workdir (its latest checkpoint and ``config.json``;
  the encoder its method leaves, ``Method.encoder``), or
- ``init.mae_checkpoint``: an official MAE checkpoint (``.pth``/``.safetensors``; ViT),
- ``init.swin_checkpoint``: an official or timm Swin checkpoint (``interop.swin_checkpoint``; Swin),
- none: training from scratch (the baseline a pretraining must beat).

A ViT's position table becomes a parameter, initialised from the pretraining grid's
sin-cos table resized to the fine-tuning grid (``vit.interpolate_pos_embedding``); a
Swin's relative position tables are resized bicubically when the fine-tuning window
(set by ``window_size`` and, where a stage's grid is smaller, the resolution) differs
from the pretraining's (``swin.resize_relative_position_tables``).
Only a fresh run loads the encoder; a resumed run continues from its own checkpoint.
A batch is ``images [B, H, W, C] float32`` (normalised, host-augmented per
``config.data``) and ``labels [B] int32``; mixup / cutmix and label smoothing
(``config.mixing``) happen in the step on the global batch (``prmim_jax.mixing``).

Experiment config keys read here: ``model`` (``classifier.classifier_config``),
``init``, ``mixing``, ``optimizer`` (``optim.classifier_optimizer_config``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from prmim_jax import checkpoint, mixing, optim
from prmim_jax.interop import mae_checkpoint, swin_checkpoint
from prmim_jax.methods import HostTransforms, Method, Variables
from prmim_jax.models import classifier, swin, vit
from prmim_jax.models import mae as mae_lib


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section (the classifier's own keys live in ``config.model``)."""
    return ml_collections.ConfigDict(dict(name="classify") | overrides)


def experiment_config() -> ml_collections.ConfigDict:
    """``train.default_config()`` made a fine-tuning experiment: MAE's fine-tuning defaults (ViT-B, Table 14);
    every key a fine-tuning run reads (``config_validation`` compares configs with it)."""
    from prmim_jax import train
    from prmim_jax.data import pipeline
    from prmim_jax.evaluate import eval_config

    config = train.default_config()
    config.batch_size = 1024
    config.method = default_config()
    config.init = init_config()
    config.model = classifier.classifier_config("B/16")
    config.optimizer = optim.classifier_optimizer_config()
    config.mixing = mixing_config()
    config.data = pipeline.data_config(
        source="tfds",
        name="imagenet2012",
        crop_scale=(0.08, 1.0),
        rand_augment="rand-m9-mstd0.5-inc1",
        random_erase_prob=0.25,
    )
    config.evals = ml_collections.ConfigDict(dict(accuracy=eval_config("accuracy")))
    return config


def init_config(**overrides) -> ml_collections.ConfigDict:
    """``config.init``: where the encoder comes from. Typed ``None`` so ``--config.init.workdir=...`` works."""
    config = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),
            mae_checkpoint=config_dict.placeholder(str),
            swin_checkpoint=config_dict.placeholder(str),
        )
    )
    config.update(overrides)
    return config


def mixing_config(**overrides) -> ml_collections.ConfigDict:
    """Mixup / CutMix and label smoothing: the paper's Table 14 (timm's ``Mixup``, batch mode)."""
    config = ml_collections.ConfigDict(
        dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
    )
    config.update(overrides)
    return config


@dataclasses.dataclass(frozen=True)
class Mixing:
    """``mixing_config`` values plus the number of classes, hashable for ``jax.jit``."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    prob: float = 1.0
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> Mixing:
        if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
            raise ValueError(f"mixing={config.to_dict()}: alphas must be >= 0.")
        if not 0 <= config.prob <= 1 or not 0 <= config.switch_prob <= 1:
            raise ValueError(f"mixing={config.to_dict()}: probabilities must lie in [0, 1].")
        if not 0 <= config.label_smoothing < 1:
            raise ValueError(f"mixing.label_smoothing={config.label_smoothing} must lie in [0, 1).")
        return cls(num_classes, **config.to_dict())

    def targets(self, rng: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(images, targets [B, num_classes] float32)``: mixed when an alpha is set, else smoothed one-hot."""
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            return mixing.mix_batch(
                rng,
                images,
                labels,
                self.num_classes,
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                switch_prob=self.switch_prob,
                prob=self.prob,
                label_smoothing=self.label_smoothing,
            )
        return images, mixing.smooth_targets(labels, self.num_classes, self.label_smoothing)


def _apply_variables(variables: Variables) -> dict:
    return (
        {"params": variables.params, "batch_stats": variables.batch_stats}
        if variables.batch_stats
        else {"params": variables.params}
    )


class Classification(Method):
    """``Method`` of the module docstring; ``model`` is the ``Classifier`` it trains."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = classifier.build_classifier(config.model)
        self.mixing = Mixing.from_config(config.mixing, config.model.num_classes)
        _check_init(config.init, classifier.architecture(config.model))
        init = config.init
        if init.workdir:
            _check_pretrained_encoder(init.workdir, self.model.encoder)
        self.optimizer(config.batch_size, config.total_steps)  # checks optimizer.name and warmup_steps

    host = HostTransforms()  # the data section's augmentations are all the host does

    def batch_spec(self, batch_size: int) -> dict:
        image = (batch_size, self.config.model.image_size, self.config.model.image_size, self.config.model.channels)
        return {
            "images": jax.ShapeDtypeStruct(image, np.float32),
            "labels": jax.ShapeDtypeStruct((batch_size,), np.int32),
        }

    def init(self, rng, batch) -> Variables:
        variables = self.model.init({"params": rng, "dropout": rng}, batch["images"], train=False)
        return Variables(variables["params"], batch_stats=variables.get("batch_stats", {}))

    def loss(self, variables: Variables, batch: dict, rng):
        """Soft-target cross-entropy of the mixed batch; ``rng`` draws the mixing and drop path."""
        mix_rng, dropout_rng = jax.random.split(rng)
        images, targets = self.mixing.targets(mix_rng, batch["images"], batch["labels"])
        logits, updates = self.model.apply(
            _apply_variables(variables), images, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, {}, updates.get("batch_stats", variables.batch_stats)

    def optimizer(self, global_batch: int, total_steps: int):
        depth, layer_ids = classifier.lr_layers(self.model)
        return optim.build_classifier_optimizer(
            self.config.optimizer,
            global_batch,
            total_steps,
            depth=depth,
            trainable_blocks=self.config.model.get("trainable_blocks"),
            layer_ids=layer_ids,
        )

    def encoder(self, params=None):
        return self.model.encoder, None if params is None else params["encoder"]

    def logits(self, variables: Variables, images: jax.Array) -> jax.Array:
        """``images [B, H, W, C] -> [B, num_classes] float32``, inference mode."""
        return self.model.apply(_apply_variables(variables), images, train=False)

    def load_pretrained(self, params: dict, shardings: dict) -> dict:
        """``params`` with the encoder of ``config.init`` in place of the random one, laid out as ``shardings``."""
        encoder = pretrained_encoder(self.config, self.model.encoder)
        if encoder is None:
            return params
        fresh = params["encoder"]
        missing = set(fresh) - set(encoder)
        if missing:
            raise ValueError(
                f"the pretrained encoder lacks {sorted(missing)}; was it trained with another architecture?"
            )

        def loaded(path, old, sharding_):
            new = encoder
            for key in path:
                new = new[key.key]
            if new.shape != old.shape:
                name = "/".join(k.key for k in path)
                raise ValueError(f"pretrained encoder's {name} is {new.shape}; the classifier needs {old.shape}.")
            return jax.device_put(new.astype(old.dtype), sharding_)

        return dict(params) | {"encoder": jax.tree_util.tree_map_with_path(loaded, fresh, shardings["encoder"])}


def model_defaults(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The reference a ``model`` section is validated against: its architecture's keys and defaults."""
    return classifier.model_defaults(model)


def _check_init(init: ml_collections.ConfigDict, architecture: str) -> None:
    """One encoder source at most, of the model's architecture."""
    if init.workdir and init.mae_checkpoint:
        raise ValueError(
            "set one of init.workdir (our pretraining run) and init.mae_checkpoint (official MAE), not both."
        )
    swin_file = init.get("swin_checkpoint")  # absent from configs saved before it existed
    if swin_file and (init.workdir or init.mae_checkpoint):
        raise ValueError("set one of init.workdir, init.mae_checkpoint and init.swin_checkpoint, not two.")
    if architecture == "swin" and init.mae_checkpoint:
        raise ValueError(
            "init.mae_checkpoint holds a ViT but model.architecture='swin'; use init.swin_checkpoint for a Swin."
        )
    if architecture != "swin" and swin_file:
        raise ValueError(
            "init.swin_checkpoint holds a Swin but the model is a ViT; start the model section from "
            "classifier.swin_classifier_config (model.architecture='swin'), or use init.mae_checkpoint."
        )


# What a pretrained encoder must share with the classifier's (a Swin's window may differ: its tables are resized).
_ENCODER_FIELDS = {
    vit.Encoder: ("width", "depth", "num_heads", "mlp_dim", "patch_size"),
    swin.SwinTransformer: ("width", "depths", "num_heads", "mlp_ratio", "patch_size"),
}


def _check_pretrained_encoder(workdir: str, encoder) -> None:
    from prmim_jax import methods

    try:
        pretraining = checkpoint.read_run_config(workdir, "pretraining")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"init.workdir={workdir}: {error} Then point it at a prmim_jax pretraining workdir."
        ) from None
    pretrained, _ = methods.build(pretraining).encoder()
    fields = _ENCODER_FIELDS[type(encoder)]
    ours, theirs = (tuple(_field(e, f) for f in fields) for e in (encoder, pretrained))
    if type(pretrained) is not type(encoder) or ours != theirs:
        raise ValueError(
            f"init.workdir={workdir} pretrained a {type(pretrained).__name__} of ({', '.join(fields)}) {theirs}, "
            f"but model asks for a {type(encoder).__name__} of {ours}; make model's variant and sizes match the "
            "pretraining run's (and its architecture)."
        )


def _field(module, name: str):
    value = getattr(module, name, None)
    return tuple(value) if isinstance(value, (list, tuple)) else value


def pretrained_encoder(config: ml_collections.ConfigDict, encoder) -> dict | None:
    """The pretrained encoder's parameters for ``encoder`` (numpy, host memory), or ``None`` without ``init``.

    A ViT's ``pos_embedding`` is the pretraining grid's sin-cos table resized to ``encoder.grid``; a
    Swin's relative position tables are resized to ``encoder``'s windows (a checkpoint's head is dropped).
    """
    if config.init.workdir:
        from prmim_jax import train

        _, method, params, _ = train.load_run(config.init.workdir)
        pretrained, params = method.encoder(params)
    elif config.init.mae_checkpoint:
        mae = mae_lib.MaskedAutoencoder(
            patch_size=encoder.patch_size,
            image_size=encoder.image_size,
            channels=config.model.channels,
            width=encoder.width,
            depth=encoder.depth,
            num_heads=encoder.num_heads,
            mlp_dim=encoder.mlp_dim,
            decoder_width=16,
            decoder_depth=1,
            decoder_num_heads=1,
            decoder_mlp_dim=16,
        )
        pretrained, params = mae_lib.encoder_of(mae), mae_checkpoint.load(config.init.mae_checkpoint, mae)["encoder"]
    elif config.init.get("swin_checkpoint"):
        pretrained, params = encoder, swin_checkpoint.load(config.init.swin_checkpoint, encoder)
    else:
        return None
    return adapt_encoder(params, pretrained, encoder)


def adapt_encoder(params: dict, pretrained, encoder) -> dict:
    """The parameters ``params`` of the ``pretrained`` encoder module, as host numpy arrays for ``encoder``
    (the classifier's): a ViT's position table resized to ``encoder.grid`` (the pretraining's fixed sin-cos
    table where it had no learned one), a Swin's relative position tables to ``encoder``'s windows."""
    params = jax.tree.map(np.asarray, params)
    if isinstance(encoder, swin.SwinTransformer):
        return swin.resize_relative_position_tables(params, encoder)
    if "pos_embedding" not in params:  # pretrained with the fixed sin-cos table
        table = vit.sincos_2d(pretrained.width, pretrained.grid)
        params["pos_embedding"] = np.asarray(vit.interpolate_pos_embedding(table, pretrained.grid, encoder.grid))
    else:
        params["pos_embedding"] = np.asarray(
            vit.interpolate_pos_embedding(jnp.asarray(params["pos_embedding"]), pretrained.grid, encoder.grid)
        )
    return params


def build(config: ml_collections.ConfigDict) -> Classification:
    return Classification(config)


def load_classifier(workdir: str | os.PathLike):
    """``(predict_fn, data_config)`` of a fine-tuning run's latest checkpoint, on this host's devices.

    ``predict_fn(images [b, H, W, C] uint8 pixels, or float32 normalised per
    ``data_config``) -> logits [b, num_classes] numpy float32``, jitted; ``data_config`` is the
    run's data section (image size, normalisation, evaluation crop).
    """
    from prmim_jax import train

    config, method, variables, _ = train.load_variables(workdir)
    if method.logits is None:
        raise ValueError(f"{workdir} is a {method.name!r} run, not a classifier; point it at a fine-tuning workdir.")
    apply = jax.jit(lambda variables, images: method.logits(variables, method.normalize(images)))

    def predict_fn(images):
        return np.asarray(apply(variables, images))

    return predict_fn, config.data
