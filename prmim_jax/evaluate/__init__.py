"""Evaluators built from ``config.evals``, big_vision style: one module per kind, looked up by ``type``.

``config.evals`` maps a name to a section with ``type`` (a module of this
package holding an ``Evaluator`` class), ``every`` (run every that many steps;
0: only at the end) and the kind's own keys::

    config.evals.knn = evaluate.eval_config("knn", every=0, k=20)
    config.evals.reconstruction = evaluate.eval_config("reconstruction", every=250)

An evaluator knows nothing of the model: its module names the predict function it
needs (``PREDICTS``: one of the method's ``predict_fns``, ``prmim_jax.methods``), and
``Evaluator(predict_fn, data=..., section=..., placement=...)`` gets that function,
the run's data section, its own section and the run's ``sharding.Placement``; ``MISSING``
says what to do when the method lacks that function. It has
``run(variables) -> dict`` whose values are float scalars or ``uint8 [H, W, 3]``
images (the trainer logs the scalars and writes each image to TensorBoard and
``WORKDIR/<name>.png``), and ``summary(results) -> str``, the line printed at the
end of a run. Kinds: ``knn`` (kNN top-1 on pooled encoder features), ``accuracy``
(a classifier's top-1 and loss on a split), ``reconstruction`` (Fig. 7 pictures),
``robustness`` (a classifier on other TFDS datasets: ImageNet-A/-R/-C...).
"""

from __future__ import annotations

import importlib
import pkgutil

import jax
import ml_collections

from prmim_jax import config_args, sharding


def kinds() -> list[str]:
    """The evaluator kinds: the modules of this package that hold an ``Evaluator``."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if hasattr(importlib.import_module(f"{__name__}.{info.name}"), "Evaluator")
    )


def eval_config(kind: str, **overrides) -> ml_collections.ConfigDict:
    """An evaluator section: the kind's defaults (its module's ``default_config``) with ``overrides``."""
    return ml_collections.ConfigDict(dict(type=kind) | _module(kind).default_config() | overrides)


def _module(kind: str):
    if kind not in kinds():
        match = config_args.closest(str(kind), kinds())
        hint = f" (did you mean {match!r}?)" if match else ""
        raise ValueError(f"unknown evaluator type {kind!r}; choose one of {', '.join(kinds())}{hint}.")
    return importlib.import_module(f"{__name__}.{kind}")


def check_batch_size(label: str, batch_size: int, placement: sharding.Placement) -> None:
    """``ValueError`` unless an evaluator's global ``batch_size`` splits over ``placement``'s batch devices and the
    processes; ``label`` names the evaluator in the message."""
    ways = placement.batch_divisor
    if batch_size % ways or batch_size % jax.process_count():
        raise ValueError(
            f"{label} batch_size={batch_size} must be divisible by the {ways} devices the batch is split over "
            f"(mesh {dict(placement.mesh.shape)}) and the {jax.process_count()} processes; change that "
            "evaluator's batch_size in config.evals."
        )


def build_evaluators(
    config: ml_collections.ConfigDict, predict_fns: dict, placement: sharding.Placement, method_name: str
) -> dict:
    """``{name: Evaluator}`` for ``config.evals``, each given the predict function its kind needs from
    ``predict_fns`` (the method's, ``method_name`` in messages); raises ``ValueError`` with the fix before
    anything compiles. An evaluator's own error is prefixed with ``evals.<name>:``, so its keys are found."""
    evaluators = {}
    for name, section in config.get("evals", {}).items():
        if "type" not in section:
            raise ValueError(f"evals.{name} has no type; set evals.{name}.type (e.g. 'knn').")
        section = eval_config(section.type, **section.to_dict())
        if not isinstance(section.every, int) or section.every < 0:
            raise ValueError(
                f"evals.{name}.every={section.every!r} must be an integer >= 0 (0: only at the end); "
                f"set --config.evals.{name}.every."
            )
        module = _module(section.type)
        if module.PREDICTS not in predict_fns:
            raise ValueError(f"evals.{name}: " + module.MISSING.format(method=repr(method_name)))
        try:
            evaluators[name] = module.Evaluator(
                predict_fns[module.PREDICTS], data=config.data, section=section, placement=placement
            )
        except ValueError as error:
            raise ValueError(f"evals.{name}: {error}") from None
    return evaluators
