"""JAX's persistent compilation cache for runs: what one launch compiled, the next reads from disk.

The config section (``compilation_cache_config``, ``config.compilation_cache``)::

    config.compilation_cache.enabled = True                        # on by default
    config.compilation_cache.directory = "~/.cache/prmim_jax/xla"  # any path JAX writes to, gs:// too
    config.compilation_cache.min_compile_seconds = 1.0             # programs compiled faster are not kept

The default directory is per user, not per workdir: a new run of the same model and shapes (another seed,
a fine-tuning, a resumed run) is a new workdir and would find a cache under the old one empty. On a pod,
a directory on storage every worker reads (``gs://bucket/xla-cache``) lets all workers share one entry.
JAX runs what the cache holds, so it must be a directory only trusted users write to.

A process that already has a cache (``JAX_COMPILATION_CACHE_DIR``, or a program that set
``jax_compilation_cache_dir`` before calling the trainer, as the test suite does) keeps its own; the
section is then not used.
"""

from __future__ import annotations

import os

import jax
import ml_collections

DEFAULT_DIRECTORY = "~/.cache/prmim_jax/xla"


def compilation_cache_config(**overrides) -> ml_collections.ConfigDict:
    """``config.compilation_cache``: ``enabled``, ``directory``, ``min_compile_seconds`` (JAX's default, 1 s)."""
    config = ml_collections.ConfigDict(dict(enabled=True, directory=DEFAULT_DIRECTORY, min_compile_seconds=1.0))
    config.update(overrides)
    return config


def enable(section: ml_collections.ConfigDict) -> str | None:
    """Points JAX's persistent cache at ``section.directory`` (``~`` expanded) unless the section is disabled or
    the process has a cache already; returns the directory in use, None when there is none. Call it before the
    run compiles its programs (what compiled earlier is compiled again, not read)."""
    current = jax.config.jax_compilation_cache_dir
    if current or not section.enabled:
        return current or None
    directory = os.path.expanduser(section.directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", section.min_compile_seconds)
    return directory
