"""TEC (Target-Enhanced Conditional pretraining, Gao et al., sail-sg/TEC), + partial, + PR-MIM (``reconstruction``).

A frozen teacher ViT reads the whole (augmented) image; a masked student
predicts, at its masked tokens, the teacher's features (mean of its last
``feature_blocks`` blocks, normalised over tokens) and, with
``attention_targets``, the last block's attention of the cls query and of the
``attention_top_k`` patches it attends to most, softened by
``attention_temperature`` (``models.tec``). Loss: feature MSE over the
predicted masked tokens + attention cross-entropy. With PR-MIM's keys
(``methods.throwing``) the decoders skip the thrown tokens (``partial``) and
aggregators reconstruct them from the decoders' outputs (``progressive``).

The teacher (``teacher`` subsection; exactly one of its sources):

- ``checkpoint``: an official ViT checkpoint in MAE / DeiT / DINO / iBOT
  layout (``.pth`` or ``.safetensors``, ``interop.vit_checkpoint``);
- ``workdir``: one of our pretraining runs (its latest checkpoint, the encoder
  its method leaves: ``prmim_jax.runs.load``);
- ``variant``: its size (``'B/16'``); None: the student's encoder size.

Its parameters are the run's ``frozen`` variables: created sharded like the
student's, read from the source once when a run starts
(``Method.load_frozen``), checkpointed with the run (a resumed run does not
read the source again), never given an optimizer state; its outputs are
under ``stop_gradient``. A batch is ``images [B, H, W, C]`` and the token sets
``ids_visible / ids_decoded / ids_thrown``. The official recipes' settings:
iBOT teacher, top-9 queries, temperature 1.0 (MAE teacher: 15, 1.8).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prmim_jax import config_args, masking
from prmim_jax.interop import vit_checkpoint
from prmim_jax.methods import Registration, RunLoader, Variables, load_into, throwing
from prmim_jax.models import tec as tec_lib
from prmim_jax.models import vit

TEACHER_HOWTO = (
    "set --config.method.teacher.checkpoint=PATH (an official MAE / DeiT / DINO / iBOT ViT checkpoint, "
    ".pth or .safetensors) or --config.method.teacher.workdir=DIR (a prmim_jax pretraining run of the "
    "teacher's size; for configs/pretrain_tec_fmnist.py pretrain one first: python -m prmim_jax.main "
    "--config configs/pretrain_fmnist.py:method=mae --workdir DIR)"
)


def teacher_config(**overrides) -> ml_collections.ConfigDict:
    """The ``teacher`` subsection: ``checkpoint``, ``workdir``, ``variant`` (module docstring)."""
    return config_args.optional_strings("checkpoint", "workdir", "variant", **overrides)


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The method section: plain TEC unless overridden; ``reconstruction='progressive'`` is TEC + PR-MIM
    (furthest sampling, rho_d 0.5: Table 4), ``'partial'`` partial reconstruction. The teacher is unset."""
    reconstruction = overrides.pop("reconstruction", "full")
    teacher = overrides.pop("teacher", {})
    keys = throwing.throwing_config(reconstruction) | dict(
        name="tec",
        teacher=teacher_config(**dict(teacher)),
        feature_blocks=2,
        attention_targets=True,
        attention_top_k=9,
        attention_temperature=1.0,
    )
    return ml_collections.ConfigDict(keys | overrides)


class TargetEnhancedConditional(throwing.ThrowingMethod):
    """``Method`` of the module docstring: ``model`` is the ``TecStudent`` it trains, ``teacher`` the frozen
    ``vit.Encoder``."""

    reconstructs_pixels = False  # the student predicts features, not pixels

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        config.method = section = throwing.complete_section(config.method, default_config)
        self.teacher_size = check_section(section, vit.encoder_size(config.model))
        attention = bool(section.attention_targets)
        probe = tec_lib.build_student(config.model, self.teacher_size, attention)
        self.throwing = throwing.Throwing.from_config(section, probe.grid)
        if attention and not 1 <= section.attention_top_k <= self.layout.num_tokens:
            raise ValueError(
                f"method.attention_top_k={section.attention_top_k} must lie in [1, {self.layout.num_tokens}] "
                "(patch queries of the teacher's attention)."
            )
        model_config = ml_collections.ConfigDict(config.model.to_dict())
        model_config.aggregation_kernel = self.throwing.kernel_size if self.throwing.progressive else 0
        model_config.aggregator = self.throwing.aggregator
        self.model = tec_lib.build_student(model_config, self.teacher_size, attention)
        self.teacher = tec_lib.teacher_encoder(
            self.teacher_size,
            self.model.image_size,
            section.feature_blocks,
            attention,
            self.model.dtype,
            self.model.attention_impl,
        )
        self.top_k = section.attention_top_k if attention else 0

    def init(self, rng, batch) -> Variables:
        student_rng, teacher_rng = jax.random.split(rng)
        images, ids = batch["images"], throwing.batch_ids(batch)
        query_ids = jnp.zeros((images.shape[0], self.top_k), jnp.int32) if self.top_k else None
        params = self.model.init(student_rng, images, *ids, query_ids=query_ids)["params"]
        teacher = self.teacher.init(teacher_rng, images)["params"]
        return Variables(params, frozen={"teacher": teacher})

    def targets(self, frozen, images) -> tec_lib.TeacherTargets:
        """The teacher's targets for ``images [B, H, W, C]`` (normalised); no gradient flows into them."""
        section = self.config.method
        targets = tec_lib.teacher_targets(self.teacher, frozen["teacher"], images, section.feature_blocks, self.top_k)
        return jax.lax.stop_gradient(targets)

    def objective(self, params, frozen, images, ids: masking.TokenIds) -> tuple[jax.Array, dict]:
        """``(loss, {feature_loss, attention_loss})`` float32 of ``images [B, H, W, C]`` with token sets ``ids``."""
        section = self.config.method
        targets = self.targets(frozen, images)
        output = self.model.apply({"params": params}, images, *ids, query_ids=targets.query_ids)
        features = tec_lib.feature_loss(
            tec_lib.normalize_over_tokens(targets.features),
            output,
            ids.decoded,
            ids.thrown,
            self.throwing.thrown_loss_weight,
        )
        metrics = {"feature_loss": features}
        if not self.top_k:
            return features, metrics
        query_valid = key_valid = None
        if self.throwing.reconstruction == "partial":  # nothing stands at the thrown positions
            key_valid = present_tokens(ids, self.layout.num_tokens)
            patch_queries = jnp.take_along_axis(key_valid, targets.query_ids, axis=1)
            query_valid = jnp.concatenate([jnp.ones_like(patch_queries[:, :1]), patch_queries], axis=1)
        attention = tec_lib.attention_loss(
            output.attention, targets.attention, section.attention_temperature, query_valid, key_valid
        )
        return features + attention, metrics | {"attention_loss": attention}

    def loss(self, variables: Variables, batch: dict, rng):
        del rng  # the student and the teacher are deterministic
        loss, metrics = self.objective(variables.params, variables.frozen, batch["images"], throwing.batch_ids(batch))
        return loss, metrics, variables.batch_stats

    def encoder(self, params=None):
        """The plain ViT (``vit.encoder_like``), the input adaptor folded into its cls token."""
        module = vit.encoder_like(self.model)
        return module, None if params is None else vit.fold_cls_token_mlp(params["encoder"])

    def load_frozen(self, frozen, shardings, load_run: RunLoader):
        """``frozen`` with the teacher's weights from ``method.teacher`` in place, laid out as ``shardings``
        (``load_run`` reads a teacher run)."""
        weights = self.teacher_weights(load_run)
        fresh = frozen["teacher"]
        if set(weights) != set(fresh):
            raise ValueError(f"the teacher has parameters {sorted(weights)}; the model needs {sorted(fresh)}.")

        loaded = load_into(
            fresh,
            weights,
            shardings["teacher"],
            lambda name, got, need: f"the teacher's {name} is {got}; a {self.teacher_size} teacher needs {need}.",
        )
        return dict(frozen) | {"teacher": loaded}

    def teacher_weights(self, load_run: RunLoader) -> dict:
        """The teacher's parameters (float32 numpy, the ``teacher`` encoder's tree) from ``method.teacher``."""
        source = self.config.method.teacher
        if source.checkpoint:
            if not os.path.exists(source.checkpoint):
                raise FileNotFoundError(
                    f"method.teacher.checkpoint={source.checkpoint} does not exist; {TEACHER_HOWTO}."
                )
            return vit_checkpoint.load(source.checkpoint, self.teacher, self.model.channels)
        return self.weights_of_run(source.workdir, load_run)

    def weights_of_run(self, workdir: str, load_run: RunLoader) -> dict:
        """The encoder a prmim_jax run leaves (``Method.encoder``) as teacher parameters (its fixed sin-cos
        table becomes the learned table's value); ``ValueError`` when its size is not the teacher's."""
        try:
            run = load_run(workdir)
        except FileNotFoundError as error:
            raise ValueError(f"method.teacher.workdir={workdir}: {error} {TEACHER_HOWTO}.") from None
        module, encoder = run.method.encoder(run.variables.params)
        fields = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size")
        theirs, ours = (
            tuple(tuple(v) if isinstance(v, tuple) else v for v in (getattr(e, f) for f in fields))
            for e in (module, self.teacher)
        )
        if theirs != ours:
            raise ValueError(
                f"method.teacher.workdir={workdir} holds an encoder of {dict(zip(fields, theirs, strict=True))}; "
                f"the teacher is {dict(zip(fields, ours, strict=True))} (method.teacher.variant, None: the "
                "student's size). Point it at a run of that size or change the variant."
            )
        encoder = jax.tree.map(np.asarray, dict(encoder))
        if "pos_embedding" not in encoder:
            encoder["pos_embedding"] = vit.sincos_2d(module.width, module.grid)
        return encoder


def check_section(section: ml_collections.ConfigDict, student: vit.VitSize) -> vit.VitSize:
    """The teacher's size; ``ValueError`` naming the fix for a missing teacher or impossible targets."""
    source = section.teacher
    if bool(source.checkpoint) == bool(source.workdir):
        given = "both are set" if source.checkpoint else "neither is set"
        raise ValueError(f"TEC distils a pretrained teacher, and {given}: {TEACHER_HOWTO}.")
    size = vit.parse_variant(source.variant) if source.variant else student
    if not 1 <= section.feature_blocks <= size.depth:
        raise ValueError(
            f"method.feature_blocks={section.feature_blocks} must lie in [1, {size.depth}] (the teacher's last "
            "blocks averaged into the feature target; 2 is the official)."
        )
    if section.attention_targets and size.depth < 2:
        raise ValueError("attention targets need a teacher of depth >= 2; set method.attention_targets=False.")
    if section.attention_temperature <= 0:
        raise ValueError(f"method.attention_temperature={section.attention_temperature} must be positive.")
    return size


def present_tokens(ids: masking.TokenIds, num_tokens: int) -> jax.Array:
    """``[B, N] bool``: True at the visible and decoded tokens (what the decoders see)."""
    present = jnp.concatenate([ids.visible, ids.decoded], axis=1)
    rows = jnp.arange(present.shape[0])[:, None]
    return jnp.zeros((present.shape[0], num_tokens), bool).at[rows, present].set(True)


REGISTRATION = Registration(
    TargetEnhancedConditional,
    default_config,
    model=lambda given: tec_lib.model_config(),
    placeholders=dict(teacher=dict(checkpoint="teacher weights, never read")),
)
