"""One validation pass over an experiment config, before anything is created, written or compiled.

``train.validate(config)`` calls ``check_config`` first, then builds what needs the
config to be sound: the method and its model (``methods.build``; the thrown set's
keys are checked in ``methods.throwing``), the mesh and the batch split
(``sharding``) and the evaluators (each checks its ``evals`` section). So one call
refuses every config that cannot run, and each refusal is one ``ValueError`` line
naming the key, the bad value and the fix.

What ``check_config`` checks itself:

- **keys**: every section against the defaults of what reads it
  (``reference_config``): ``base_config.experiment_config()`` for the top level,
  ``optimizer`` and ``sharding``, with the method's ``Registration`` for ``model``
  (a classifier's ViT or Swin keys, by its own section), ``method`` and the
  method's own sections (fine-tuning's ``init``, ``mixing``, ``optimizer``);
  ``data_defaults(source)`` for ``data``; ``eval_config(type)`` for each
  ``evals`` section. A key nothing reads
  is refused with the closest known key suggested (``difflib``), since a typo
  would otherwise be ignored silently.
- **types**: a value has its default's type (an int where the default is an int,
  a number where it is a float, a string, a bool, a sequence); ``None`` is left to
  the range checks and builders, since some keys allow it.
- **ranges**: the loop keys, the profile window and the compilation cache, the optimizer, the model's
  sizes, the sharding mesh and rules, and the data section (``schema.check_config``, and
  ``schema.check_split`` for the training split on disk).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import ml_collections

from prmim_jax import base_config, config_args, methods, optim, sharding
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config

# The loop keys: (key, smallest value, the fix).
LOOP_KEYS = (
    ("seed", 0, "set --config.seed to a non-negative integer"),
    ("batch_size", 1, "set --config.batch_size to the global number of images per step"),
    ("total_steps", 1, "set --config.total_steps to a positive number of steps"),
    ("log_every", 1, "set --config.log_every to a positive number of steps"),
    ("checkpoint_every", 1, "set --config.checkpoint_every to a positive number of steps (the last is always saved)"),
    (
        "keep_checkpoints",
        1,
        "a finished run would keep no checkpoint to resume or evaluate; set --config.keep_checkpoints to 1 or more",
    ),
    ("stop_after", 0, "set --config.stop_after to 0 (run to total_steps) or a positive number of steps"),
    (
        "grad_accum_steps",
        1,
        "set --config.grad_accum_steps to the number of microbatches per update (1: none); batch_size stays the "
        "images per update",
    ),
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` (one line: key, value, fix) for the first key, type or range that cannot work."""
    reference = reference_config(config)
    check_keys_and_types(config, reference)
    check_loop(config)
    check_profile(config)
    check_compilation_cache(config.compilation_cache)
    check_optimizer(config)
    check_model(config.model)
    check_sharding(config.sharding)
    schema.check_config(config.data)
    schema.check_split(config.data, config.data.split, "data.split")


# --- keys and types --------------------------------------------------------------------------------


def refuse_unknown_keys(path: str, given, known) -> None:
    """``ValueError`` (``config_args.unknown_key_message``: a key that moved is named where it went) for the first
    key of ``given`` that is not in ``known``."""
    for key in sorted(given):
        if key not in known:
            below = ".KEY" if isinstance(given[key], ml_collections.ConfigDict) else ""
            raise ValueError(config_args.unknown_key_message(path, key, known, below))


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every key a run of ``config``'s method, data source and evaluators reads, with its default.

    Raises ``ValueError`` (with the choices and the closest one) for an unknown
    ``method.name``, ``data.source`` or evaluator ``type``, since those pick the
    sections the other keys are compared with.
    """
    for section in ("method", "data"):
        if not isinstance(config.get(section), ml_collections.ConfigDict):
            raise ValueError(
                f"config has no {section} section; start from base_config.experiment_config() with the method's."
            )
    name = methods.canonical_section(config.method).name
    registration = methods.registration(name)
    model = config.get("model") if isinstance(config.get("model"), ml_collections.ConfigDict) else None
    reference = base_config.experiment_config(
        model=registration.model(model), method=methods.method_config(name), **registration.sections()
    )
    source = config.data.get("source", "fashion_mnist")
    if source not in schema.SOURCES:
        match = config_args.closest(str(source), schema.SOURCES)
        hint = f"did you mean {match!r}? " if match else ""
        raise ValueError(
            f"data.source={source!r} is not a data source: {hint}set --config.data.source to one of {schema.SOURCES}."
        )
    reference.data = ml_collections.ConfigDict(schema.data_defaults(source))
    evals = {}
    for eval_name, section in config.get("evals", {}).items():
        if not isinstance(section, ml_collections.ConfigDict) or "type" not in section:
            raise ValueError(f"evals.{eval_name} has no type; set evals.{eval_name}.type (e.g. 'knn').")
        evals[eval_name] = eval_config(section.type)
    reference.evals = ml_collections.ConfigDict(evals)
    return reference


def _type_name(kind: type) -> str:
    return {bool: "a bool", int: "an integer", float: "a number", str: "a string"}.get(kind, "a sequence")


def _has_type(value, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # an int, or a pair of them (image_size=(h, w))
        if isinstance(value, (tuple, list)):
            return all(_is_int(v) for v in value)
        return _is_int(value)
    if kind is float:
        return _is_real(value)
    if kind is str:
        return isinstance(value, str)
    return isinstance(value, (tuple, list))


def check_keys_and_types(
    given: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, path: str = ""
) -> None:
    """Refuses keys of ``given`` that ``reference`` lacks and values whose type differs from the default's,
    section by section (``path``: where ``given`` sits, '' for the top level)."""
    refuse_unknown_keys(path, given, reference)
    for key in sorted(given):
        full = f"{path}.{key}" if path else key
        value, default = given[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"{full}={value!r} must be a section (a ConfigDict) like its default.")
            check_keys_and_types(value, default, full)
            continue
        kind = reference.get_type(key)
        if kind not in (bool, int, float, str, tuple, list) or value is None:
            # No default type to hold it to; or None, which some keys allow (layer_scale_init: no layer
            # scale) and the range checks and builders refuse where it means nothing (batch_size=None).
            continue
        if not _has_type(value, kind):
            raise ValueError(
                f"{full}={value!r} must be {_type_name(kind)} like its default {default!r}; "
                f"set --config.{full} to {_type_name(kind)}."
            )


# --- ranges ----------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(path: str, value, minimum: int, fix: str, *, optional: bool = False) -> None:
    """``ValueError`` unless ``value`` is an integer >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{path}={value!r} must be an integer >= {minimum}; {fix}.")


def require_number(
    path: str,
    value,
    low: float,
    high: float = math.inf,
    fix: str = "",
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """``ValueError`` unless ``value`` is a finite number in the interval from ``low`` to ``high``."""
    if optional and value is None:
        return
    inside = _is_real(value) and math.isfinite(value)
    inside = inside and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        if high == math.inf:
            interval = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{path}={value!r} must be a finite number {interval}; {fix}.")


def check_loop(config: ml_collections.ConfigDict) -> None:
    """The trainer's own keys (``LOOP_KEYS``)."""
    for key, minimum, fix in LOOP_KEYS:
        if key not in config:
            raise ValueError(
                f"config has no {key}; start from base_config.experiment_config(), which has every loop key."
            )
        require_int(key, config[key], minimum, fix)


def check_profile(config: ml_collections.ConfigDict) -> None:
    """``profile.start_step`` and ``num_steps`` (``profiling``): a trace that starts within the run."""
    section = config.profile
    require_int(
        "profile.start_step", section.start_step, 0, "set --config.profile.start_step to the steps before the trace"
    )
    require_int(
        "profile.num_steps",
        section.num_steps,
        0,
        "set --config.profile.num_steps to 0 (no trace) or the steps to trace",
    )
    if section.num_steps and section.start_step >= config.total_steps:
        raise ValueError(
            f"profile.start_step={section.start_step} leaves no step of total_steps={config.total_steps} to trace; "
            "lower --config.profile.start_step."
        )


def check_compilation_cache(section: ml_collections.ConfigDict) -> None:
    """``compilation_cache.directory`` (a path) and ``min_compile_seconds`` of an enabled cache."""
    if section.enabled and not section.directory:
        raise ValueError(
            "compilation_cache.directory is empty; set --config.compilation_cache.directory to a path, or "
            "--config.compilation_cache.enabled=False."
        )
    require_number(
        "compilation_cache.min_compile_seconds",
        section.min_compile_seconds,
        0,
        fix="set --config.compilation_cache.min_compile_seconds to 0 (keep every program) or more",
    )


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """The optimizer section's values (the keys it has: pretraining's, or a classifier's with ``layer_decay`` /
    ``momentum``), then its schedule (``optim.learning_rate_schedule`` checks ``warmup_steps``)."""
    section = config.optimizer

    def check(key, *args, **kwargs):
        if key in section:
            require_number(f"optimizer.{key}", section[key], *args, **kwargs)

    check(
        "base_lr",
        0,
        fix="set --config.optimizer.base_lr to the learning rate per 256 images (MAE: 1.5e-4)",
        low_open=True,
    )
    check("min_lr", 0, fix="set --config.optimizer.min_lr to the final learning rate (0 by default)")
    for beta in ("b1", "b2"):
        check(
            beta, 0, 1, fix=f"set --config.optimizer.{beta} to an Adam decay rate such as 0.9 or 0.95", high_open=True
        )
    check("weight_decay", 0, fix="set --config.optimizer.weight_decay to 0 (off) or a positive number such as 0.05")
    check(
        "grad_clip_norm",
        0,
        fix="set --config.optimizer.grad_clip_norm to a positive norm, or 0 for no clipping",
        optional=True,
    )
    check(
        "layer_decay",
        0,
        1,
        fix="set --config.optimizer.layer_decay in (0, 1]; 1.0 turns layer-wise decay off",
        low_open=True,
    )
    check("momentum", 0, 1, fix="set --config.optimizer.momentum to a rate such as 0.9", high_open=True)
    require_int(
        "optimizer.warmup_steps",
        section.warmup_steps,
        0,
        "set --config.optimizer.warmup_steps to 0 (no warmup) or a number of steps",
    )
    optim.learning_rate_schedule(section, config.batch_size, config.total_steps)


def check_model(model: ml_collections.ConfigDict) -> None:
    """The sizes every model section shares (what each model's builder checks beyond them stays with it).

    ``depths`` and ``num_heads`` of a Swin are sequences, one positive integer per stage."""
    for key in ("width", "depth", "num_heads", "patch_size", "window_size"):
        if key in model and not isinstance(model[key], (tuple, list)):
            fix = f"set --config.model.{key} to a positive integer, or None for the variant's ({model.variant})"
            require_int(f"model.{key}", model[key], 1, fix, optional=True)
    for key in ("depths", "num_heads"):
        value = model.get(key)
        if isinstance(value, (tuple, list)) and not (value and all(_is_int(v) and v >= 1 for v in value)):
            raise ValueError(
                f"model.{key}={value!r} must be positive integers, one per stage; set --config.model.{key} like "
                "'(2, 2, 6, 2)', or None for the variant's."
            )
    for key, minimum in (("decoder_width", 1), ("decoder_num_heads", 1), ("decoder_depth", 0)):
        if key in model:
            require_int(f"model.{key}", model[key], minimum, f"set --config.model.{key} to an integer >= {minimum}")
    for key in ("mlp_ratio", "decoder_mlp_ratio"):
        if key in model:
            require_number(f"model.{key}", model[key], 0, fix=f"set --config.model.{key} such as 4.0", low_open=True)
    sizes = model.image_size if isinstance(model.image_size, (tuple, list)) else (model.image_size,)
    if len(sizes) not in (1, 2) or not all(_is_int(s) and s >= 1 for s in sizes):
        raise ValueError(
            f"model.image_size={model.image_size!r} must be a positive integer or an (h, w) pair; "
            "set --config.model.image_size (and data.image_size) to the image side in pixels."
        )


def check_sharding(section: ml_collections.ConfigDict) -> None:
    """``mesh``: ``(axis name, size)`` pairs, sizes >= 1 or one -1; ``rules``: ``(logical axis, mesh axes)``
    pairs naming only mesh axes, or ``dcn`` (one slice where the mesh lacks it). (Whether the mesh tiles the
    devices, and its ``dcn`` axis the slices, is ``sharding.make_mesh``'s check.)"""
    example = '--config.sharding.mesh=\'(("data", -1), ("fsdp", 1))\''
    mesh = section.mesh
    pairs = isinstance(mesh, Sequence) and not isinstance(mesh, str) and len(mesh) > 0
    pairs = pairs and all(isinstance(p, Sequence) and len(p) == 2 and isinstance(p[0], str) for p in mesh)
    if not pairs or not all(_is_int(size) and (size >= 1 or size == -1) for _, size in mesh):
        raise ValueError(
            f"sharding.mesh={mesh!r} must be (axis name, size) pairs with sizes >= 1 or -1 (the remaining "
            f"devices); set it like {example}."
        )
    axes = {name for name, _ in mesh}
    for rule in section.rules:
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"sharding.rules entry {rule!r} must be a (logical axis, mesh axes) pair, e.g. ('embed', 'fsdp')."
            )
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for target in targets:
            # A mesh without a dcn axis is one slice: a rule's dcn is dropped there (sharding.rules_on_mesh).
            if target is not None and target not in axes and target != sharding.DCN_AXIS:
                raise ValueError(
                    f"sharding.rules maps {rule[0]!r} to mesh axis {target!r}, which sharding.mesh={mesh!r} lacks; "
                    f"add ({target!r}, 1) to --config.sharding.mesh or change the rule."
                )
