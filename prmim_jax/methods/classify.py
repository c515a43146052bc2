"""Fine-tuning, partial fine-tuning and linear probing as a method of the one trainer.

The classifier (``models.classifier``: a ViT, or a Swin with ``model.architecture='swin'``)
trains on a pretrained encoder from ``config.init`` (at most one of):

- ``init.workdir``: a prmim_jax workdir (its latest checkpoint and ``config.json``;
  the encoder its method leaves, ``Method.encoder``), or
- ``init.checkpoint``: a released pretraining checkpoint of any framework (``.pth``/``.safetensors``)
  in ``init.checkpoint_layout`` (``'auto'``: detected from its keys; ``interop.official.LAYOUTS``:
  MAE, SimMIM's ViT, LocalMIM, TEC, mmpretrain's (MFF), Swin incl. GreenMIM), read into the
  encoder its framework pretrained (``interop.official``); ``init.mae_checkpoint`` and
  ``init.swin_checkpoint`` are its older names, with the layout ``'mae'`` / ``'swin'``,
- none: training from scratch (the baseline a pretraining must beat).

A file of another framework, layout or size than the classifier's encoder stops the run
before anything compiles (read from its names and shapes alone).

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

import jax
import ml_collections
import numpy as np
import optax

from prmim_jax import checkpoint, config_args, mixing, optim
from prmim_jax.interop import official
from prmim_jax.methods import HostTransforms, Method, Registration, RunLoader, Variables, build, load_into
from prmim_jax.models import classifier


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section (the classifier's own keys live in ``config.model``)."""
    return ml_collections.ConfigDict(dict(name="classify") | overrides)


# The older names of ``init.checkpoint``, each with its layout.
CHECKPOINT_ALIASES = (("mae_checkpoint", "mae"), ("swin_checkpoint", "swin"))


def init_config(**overrides) -> ml_collections.ConfigDict:
    """``config.init``: where the encoder comes from (``workdir``; ``checkpoint`` in ``checkpoint_layout``, and its
    older names ``mae_checkpoint``, ``swin_checkpoint``)."""
    names = ("workdir", "checkpoint", "checkpoint_layout", *dict(CHECKPOINT_ALIASES))
    return config_args.optional_strings(*names, **(dict(checkpoint_layout=official.AUTO) | overrides))


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
        _check_init(config.init, self.model.encoder, config.model.channels)
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
        """``images [B, H, W, C]`` (uint8 pixels or normalised) -> ``[B, num_classes] float32``, inference mode."""
        return self.model.apply(_apply_variables(variables), self.normalize(images), train=False)

    def predict_fns(self) -> dict:
        return super().predict_fns() | {"logits": self.logits}

    def load_pretrained(self, params: dict, shardings: dict, load_run: RunLoader) -> dict:
        """``params`` with the encoder of ``config.init`` in place of the random one, laid out as ``shardings``
        (``load_run`` reads a pretraining run)."""
        encoder = pretrained_encoder(self.config, self.model.encoder, load_run)
        if encoder is None:
            return params
        fresh = params["encoder"]
        missing = set(fresh) - set(encoder)
        if missing:
            raise ValueError(
                f"the pretrained encoder lacks {sorted(missing)}; was it trained with another architecture?"
            )
        loaded = load_into(
            fresh,
            encoder,
            shardings["encoder"],
            lambda name, got, need: f"pretrained encoder's {name} is {got}; the classifier needs {need}.",
        )
        return dict(params) | {"encoder": loaded}


def _checkpoint(init: ml_collections.ConfigDict) -> tuple[str, str, str] | None:
    """``(its init key, path, layout)`` of the checkpoint file ``init`` names, or None (keys absent from configs
    saved before they existed count as unset)."""
    if init.get("checkpoint"):
        return "checkpoint", init.checkpoint, init.get("checkpoint_layout") or official.AUTO
    return next(((key, init[key], layout) for key, layout in CHECKPOINT_ALIASES if init.get(key)), None)


def _check_init(init: ml_collections.ConfigDict, encoder, channels: int) -> None:
    """One encoder source at most; a checkpoint file in a known layout whose framework and sizes ``encoder`` (the
    classifier's, for images of ``channels`` channels) takes, read from its names and shapes alone."""
    sources = [f"init.{key}" for key in ("workdir", "checkpoint", *dict(CHECKPOINT_ALIASES)) if init.get(key)]
    if len(sources) > 1:
        raise ValueError(
            f"{' and '.join(sources)} are set; set one of init.workdir (our pretraining run) and init.checkpoint (a "
            "released file; init.mae_checkpoint / init.swin_checkpoint: its older names), not both."
        )
    layout = init.get("checkpoint_layout") or official.AUTO
    if layout != official.AUTO:
        try:
            official.layout_named(layout)
        except ValueError as error:
            raise ValueError(f"init.checkpoint_layout={layout!r}: {error}") from None
    source = _checkpoint(init)
    if source is not None:
        key, path, layout = source
        try:
            official.check(path, encoder, layout, channels)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"init.{key}={path}: {error}") from None


def _check_pretrained_encoder(workdir: str, encoder) -> None:
    """``ValueError`` unless the run in ``workdir`` leaves an encoder of ``encoder``'s ``architecture``, read from
    its saved config alone (before anything is loaded)."""
    try:
        pretraining = checkpoint.read_run_config(workdir, "pretraining")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"init.workdir={workdir}: {error} Then point it at a prmim_jax pretraining workdir."
        ) from None
    pretrained, _ = build(pretraining).encoder()
    family = pretrained.architecture["family"]
    if family != encoder.architecture["family"]:
        raise ValueError(
            f"init.workdir={workdir} pretrained a {family} encoder ({pretraining.method.name}), which the model's "
            f"{encoder.architecture['family']} encoder cannot take: fine-tune it with {classifier.FINETUNING_HINTS[family]}."
        )
    if pretrained.architecture != encoder.architecture:
        raise ValueError(
            f"init.workdir={workdir} pretrained an encoder of {pretrained.architecture}, but model asks for "
            f"{encoder.architecture}; make model's variant and sizes match the pretraining run's (and its "
            "architecture)."
        )


def pretrained_encoder(config: ml_collections.ConfigDict, encoder, load_run: RunLoader) -> dict | None:
    """The pretrained encoder's parameters for ``encoder`` (numpy, host memory), or ``None`` without ``init``,
    adapted by ``encoder.adapt_pretrained``: a ViT's ``pos_embedding`` is the pretraining grid's table resized
    to ``encoder.grid`` (TEC's input adaptor folded into the cls token), a Swin's relative position tables are
    resized to its windows (a checkpoint's head is dropped). ``load_run`` reads ``init.workdir``; a checkpoint
    file is read into the encoder its framework pretrained (``interop.official.load``).
    """
    if config.init.workdir:
        run = load_run(config.init.workdir)
        pretrained, params = run.method.encoder(run.variables.params)
    elif _checkpoint(config.init):
        _, path, layout = _checkpoint(config.init)
        pretrained, params = official.load(path, encoder, layout, config.model.channels)
    else:
        return None
    return encoder.adapt_pretrained(params, pretrained)


REGISTRATION = Registration(
    Classification,
    default_config,
    model=classifier.model_defaults,
    sections=lambda: dict(init=init_config(), mixing=mixing_config(), optimizer=optim.classifier_optimizer_config()),
)
