"""The method-agnostic experiment config: the sections and keys the trainer reads for every method.

An experiment config (``configs/*.py``) starts from ``experiment_config`` and
fills in its model and method sections (each model and method module has its
``*_config`` function) and whatever it changes::

    config = base_config.experiment_config(model=mae.model_config("B/16"), method=mae.default_config())

Validation (``prmim_jax.config_validation``) holds a config to this plus the
method's own sections (``methods.Registration``).
"""

from __future__ import annotations

import ml_collections

from prmim_jax import compilation_cache, optim, profiling, sharding
from prmim_jax.data import schema


def experiment_config(**sections) -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults (MAE's Table 13 loop: batch 4096); ``sections`` (``model``,
    ``method``, ``optimizer``, ``data``, ``evals``, ...) replace or add sections and top-level keys.

    Keys: ``seed``, ``batch_size`` (global: the images of one optimizer update, which the learning rate
    scales with), ``grad_accum_steps`` (microbatches each update's batch is computed in, ``train_step``),
    ``total_steps``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``stop_after`` (> 0: save
    and stop after this many steps of this invocation, for scheduler time limits);
    sections ``model`` and ``method`` (empty here: the method's), ``optimizer``
    (``optim.optimizer_config``), ``data`` (``data.schema.data_config``),
    ``sharding`` (``sharding.sharding_config``), ``evals`` (name -> evaluator
    section, ``evaluate.eval_config``), ``profile`` (``profiling.profile_config``: off) and
    ``compilation_cache`` (``compilation_cache.compilation_cache_config``: on).
    """
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=4096,
            grad_accum_steps=1,
            total_steps=1000,
            model=ml_collections.ConfigDict(),
            method=ml_collections.ConfigDict(),
            optimizer=optim.optimizer_config(),
            data=schema.data_config(),
            sharding=sharding.sharding_config(),
            evals=ml_collections.ConfigDict(),
            log_every=50,
            checkpoint_every=1000,
            keep_checkpoints=3,
            stop_after=0,
            profile=profiling.profile_config(),
            compilation_cache=compilation_cache.compilation_cache_config(),
        )
    )
    for key, value in sections.items():  # replaced whole: a section is never merged with the default's keys
        config[key] = value
    return config
