"""Shared fixtures: tiny models and batches that keep the suite fast on two CPU cores."""

import atexit
import fcntl
import os
import pathlib
import shutil
import socket
import tempfile

from compile_flags import xla_flags  # re-exported: subprocess tests take their flags from here

# Eight simulated CPU devices for the sharding tests, set before JAX starts. Subprocesses inherit it, or
# set their own count with ``xla_flags``, which a subprocess that imports a test module (and so this one) keeps.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prmim_jax import base_config, masking, methods, optim, runs
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config
from prmim_jax.methods import classify
from prmim_jax.models import classifier, mae

# Much of the suite compiles the same program more than once (a tiny run trained, stopped and resumed; one
# step in several tests). JAX's persistent compilation cache, in a directory of this test process's own,
# compiles each once: the same program gives the same executable, so no test sees a difference.
# Subprocesses compile on their own.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="prmim-test-compilation-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Runs the tests launch as subprocesses (main.py) use this cache too, unless a test gives them their own: a run
# keeps the cache its process already has (prmim_jax.compilation_cache), so the suite never fills the runs'
# default cache under ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)


def free_port() -> int:
    """A TCP port no process on this machine listens on now, for a multi-process test's coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_once_per_session(tmp_path_factory, name: str, produce) -> pathlib.Path:
    """The directory where ``produce(directory)`` ran, once per test session however many pytest-xdist
    workers ask: the first runs it in a directory of the session's that every worker sees, the others wait
    for it and read what it left. For module fixtures that are whole runs (a smoke run of a benchmark),
    which xdist would otherwise repeat in each worker that draws one of the module's tests."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory; each worker's own lies below it
    directory = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".done").exists():  # also after a worker whose run failed: the next one retries
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            produce(directory)
            (directory / ".done").touch()
    return directory


def tiny_model_config(**overrides):
    """A 28x28 one-channel MAE with a 14x14 token grid (patch 2), small widths."""
    base = dict(
        width=32,
        depth=2,
        num_heads=4,
        patch_size=2,
        image_size=28,
        channels=1,
        decoder_width=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    return mae.model_config("Ti/2", **(base | overrides))


@pytest.fixture
def tiny_mae():
    return mae.build_mae(tiny_model_config())


@pytest.fixture
def tiny_batch(tiny_mae):
    """``(images [4, 28, 28, 1], TokenIds)`` with MAE's masking at 0.75."""
    rng = np.random.default_rng(0)
    layout = masking.TokenLayout(tiny_mae.grid, 0.75)
    images = jnp.asarray(rng.normal(size=(4, 28, 28, 1)).astype(np.float32))
    return images, masking.random_masking(rng.uniform(size=(4, layout.num_tokens)), layout)


@pytest.fixture
def tiny_variables(tiny_mae, tiny_batch):
    """Boxed (logically partitioned) variables of ``tiny_mae``."""
    images, ids = tiny_batch
    return tiny_mae.init(jax.random.key(0), images, ids.visible, ids.decoded)


@pytest.fixture
def tiny_params(tiny_variables):
    return nn.unbox(tiny_variables)["params"]


def mae_experiment():
    """An experiment config with MAE's Table 13 defaults (ViT-B/16, PR-MIM's method section, kNN at the end)
    that a test shrinks to its needs."""
    return base_config.experiment_config(
        model=mae.model_config("B/16"),
        method=methods.method_config("prmim"),
        evals=ml_collections.ConfigDict(dict(knn=eval_config("knn"))),
    )


def finetune_experiment():
    """A fine-tuning experiment with MAE's Table 14 defaults (ViT-B/16) that a test shrinks to its needs."""
    return base_config.experiment_config(
        batch_size=1024,
        model=classifier.classifier_config("B/16"),
        method=classify.default_config(),
        init=classify.init_config(),
        mixing=classify.mixing_config(),
        optimizer=optim.classifier_optimizer_config(),
        data=schema.data_config(
            source="tfds",
            name="imagenet2012",
            crop_scale=(0.08, 1.0),
            rand_augment="rand-m9-mstd0.5-inc1",
            random_erase_prob=0.25,
        ),
        evals=ml_collections.ConfigDict(dict(accuracy=eval_config("accuracy"))),
    )


def load_run(workdir, step=None):
    """``(config, method, params, step)`` of a run (``runs.load``): the trained parameters most tests compare."""
    run = runs.load(workdir, step)
    return run.config, run.method, run.variables.params, run.step
