"""Evaluators built from ``config.evals``, big_vision style: one module per kind, looked up by ``type``.

``config.evals`` maps a name to a section with ``type`` (a module of this
package holding an ``Evaluator`` class), ``every`` (run every that many steps;
0: only at the end) and the kind's own keys::

    config.evals.knn = evaluate.eval_config("knn", every=0, k=20)
    config.evals.reconstruction = evaluate.eval_config("reconstruction", every=250)

An ``Evaluator(method, setup, config, section)`` has ``run(state) -> dict``
whose values are float scalars or ``uint8 [H, W, 3]`` images (the trainer logs
the scalars and writes each image to TensorBoard and ``WORKDIR/<name>.png``),
and ``summary(results) -> str``, the line printed at the end of a run.
Kinds: ``knn`` (kNN top-1 on encoder features), ``accuracy`` (a classifier's
top-1 and loss on a split), ``reconstruction`` (Fig. 7 pictures),
``robustness`` (a classifier on other TFDS datasets: ImageNet-A/-R/-C...).
"""

from __future__ import annotations

import importlib

import ml_collections


def eval_config(kind: str, **overrides) -> ml_collections.ConfigDict:
    """An evaluator section: the kind's defaults (its module's ``default_config``) with ``overrides``."""
    return ml_collections.ConfigDict(dict(type=kind) | _module(kind).default_config() | overrides)


def _module(kind: str):
    try:
        return importlib.import_module(f"{__name__}.{kind}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{kind}":
            raise
        import difflib

        kinds = ("knn", "accuracy", "reconstruction", "robustness")
        match = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"unknown evaluator type {kind!r}; choose one of {', '.join(kinds)}{hint}.") from None


def in_process(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``data`` for a short evaluation pass: read in this process, so no worker processes outlive it."""
    return ml_collections.ConfigDict(data.to_dict() | {"num_workers": 0})


def check_batch_size(label: str, batch_size: int, setup) -> None:
    """``ValueError`` unless an evaluator's global ``batch_size`` splits over ``setup``'s batch devices and the
    processes; ``label`` names the evaluator in the message."""
    import jax

    from prmim_jax import sharding

    ways = sharding.batch_divisor(setup.mesh, setup.rules)
    if batch_size % ways or batch_size % jax.process_count():
        raise ValueError(
            f"{label} batch_size={batch_size} must be divisible by the {ways} devices the batch is split over "
            f"(mesh {dict(setup.mesh.shape)}) and the {jax.process_count()} processes; change that evaluator's batch_size in config.evals."
        )


def build_evaluators(method, setup, config: ml_collections.ConfigDict) -> dict:
    """``{name: Evaluator}`` for ``config.evals``; raises ``ValueError`` with the fix before anything compiles.

    An evaluator's own error is prefixed with ``evals.<name>:``, so its keys are found in the config."""
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
        try:
            evaluators[name] = _module(section.type).Evaluator(method, setup, config, section)
        except ValueError as error:
            raise ValueError(f"evals.{name}: {error}") from None
    return evaluators
