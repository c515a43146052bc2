"""Methods as plug-ins: a framework (MAE, SimMIM, ...) or a task (fine-tuning) is one module, looked up by name.

``config.method.name`` names a module of this package (``prmim_jax.methods.<name>``),
as big_vision looks up models by name. The module declares itself with one
``REGISTRATION = methods.Registration(...)``: its ``Method`` class (built from the
whole experiment config), its method section's defaults, the model section it
reads and any further sections. The trainer (``prmim_jax.train``) and the
evaluators (``prmim_jax.evaluate``) use only the protocol below, never a
method's name.

The protocol (``Method``), both halves of a method's work:

- ``host``: ``HostTransforms``, what the data pipeline adds to each batch on the
  host (token sets, targets computed with numpy): a per-example random map and a
  per-batch map emitting named arrays.
- ``batch_spec(batch_size)``: the named arrays of one training batch (shapes and
  dtypes), from which parameters are initialised and the step compiled.
- ``init(rng, batch) -> Variables``: parameters (trained), ``frozen`` ones (a
  teacher: carried and checkpointed, never updated) and ``batch_stats``.
- ``loss(variables, batch, rng) -> (loss, metrics, batch_stats)``: the
  objective on one batch, a float32 scalar, float32 scalar metrics and the
  updated running statistics.
- ``optimizer(global_batch, total_steps)``: the optax transformation.
- ``encoder(params=None) -> (module, encoder params)``: the encoder the method
  leaves for evaluation, fine-tuning and export; every such module has
  ``features(images) -> models.features.EncoderOutput`` (one output type for
  every architecture), ``tokens_normalized``, ``architecture``, ``layer_id`` and
  ``adapt_pretrained``. ``params`` None gives ``(module, None)``.
- ``predict_fns() -> {name: fn}``: what evaluators and tools are given (big_vision's
  ``predict_fn``), each on ``(variables, images)`` with images as the pipeline
  gives them (uint8 pixels or normalised floats): ``features`` (``EncoderOutput``)
  and ``pooled`` (``[B, D] float32``) for every method, ``logits`` (``[B, K] float32``)
  for classifiers, ``picture`` (``(variables, images, seed) -> Picture``) for
  methods that reconstruct pixels.
- ``load_pretrained(params, shardings, load_run)`` and ``load_frozen(frozen,
  shardings, load_run)``: a fresh run's starting and frozen parameters (a
  classifier's pretrained encoder, TEC's teacher); ``load_run(workdir) ->
  TrainedRun`` reads another run (``prmim_jax.runs.load``, passed in by the trainer).
- ``host_state(placement, global_batch) -> HostState | None``: per-image state a
  sampler keeps across steps (AMT's attention maps), declared by ``HostState``.

Adding a framework: write ``prmim_jax/methods/<name>.py`` with
``default_config(**overrides)`` (its method section), a ``Method`` subclass and
``REGISTRATION``; its model under ``prmim_jax/models/``; a config under
``configs/``; tests. Methods with a thrown set share ``prmim_jax.methods.throwing``
(sampler, rho_d, the three reconstructions and the aggregator).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax
import jax
import ml_collections
import numpy as np

from prmim_jax import sharding
from prmim_jax.data import transforms
from prmim_jax.data.pipeline import HostTransforms  # re-exported: part of the protocol

# Method names of earlier configs (and saved ``config.json`` files) -> (module, method-section overrides).
LEGACY_NAMES = {
    "partial": ("mae", {"reconstruction": "partial"}),
    "prmim": ("mae", {"reconstruction": "progressive"}),
}


@flax.struct.dataclass
class Variables:
    """Everything a method's step reads (a pytree): trained ``params``, ``frozen`` parameters, running
    ``batch_stats``."""

    params: Any
    frozen: Any = flax.struct.field(default_factory=dict)
    batch_stats: Any = flax.struct.field(default_factory=dict)


class TrainedRun(NamedTuple):
    """A run read from its workdir (``prmim_jax.runs.load``): its config, method, variables and step."""

    config: ml_collections.ConfigDict
    method: Method
    variables: Variables
    step: int


RunLoader = Callable[[str], TrainedRun]  # workdir -> its latest checkpoint's run


class HostState(Protocol):
    """Per-image state a sampler keeps on the hosts across steps (``Method.host_state``; AMT's attention maps).

    The trainer calls ``sample`` on every host batch, ``refresh`` after every step (before that step's
    checkpoint), and saves ``state_dict()`` / restores ``load_state_dict`` with every checkpoint.
    """

    def sample(self, batch: dict) -> dict:
        """A host batch -> the training batch (``batch_spec``'s arrays)."""

    def refresh(self, step: int, params) -> str | None:
        """After ``step`` steps with trained ``params``: updates the state when due; a line for the log then."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """This process's share, ``{name: array}``, for its checkpoint."""

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restores ``state_dict``'s arrays."""


class Method(abc.ABC):
    """The protocol of the module docstring. Subclasses hold the experiment config and their model."""

    config: ml_collections.ConfigDict  # the whole experiment config

    @property
    def name(self) -> str:
        return self.config.method.name

    @property
    @abc.abstractmethod
    def host(self) -> HostTransforms:
        """The data pipeline's per-example and per-batch transforms for this method."""

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The named arrays of a training batch of ``batch_size`` images."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: dict) -> Variables:
        """Fresh variables (parameters boxed with their logical axes) for a batch like ``batch``."""

    @abc.abstractmethod
    def loss(self, variables: Variables, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict, Any]:
        """``(loss float32 scalar, metrics {name: float32 scalar}, new batch_stats)`` of one training batch."""

    @abc.abstractmethod
    def optimizer(self, global_batch: int, total_steps: int):
        """The optax ``GradientTransformation`` (learning-rate schedule included)."""

    @abc.abstractmethod
    def encoder(self, params=None) -> tuple[Any, Any]:
        """``(encoder module, its params or None)``: the module's ``features(images [B, H, W, C])`` is an
        ``EncoderOutput``."""

    def features(self, variables: Variables, images):
        """``images [B, H, W, C]`` (uint8 pixels or normalised) -> the encoder's ``EncoderOutput``, inference mode."""
        module, params = self.encoder(variables.params)
        return module.apply({"params": params}, self.normalize(images), method=module.features)

    def pooled(self, variables: Variables, images) -> jax.Array:
        """``images [B, H, W, C]`` -> ``[B, D] float32``: the encoder's pooled features (kNN's)."""
        return self.features(variables, images).pooled

    def predict_fns(self) -> dict[str, Callable]:
        """The predict functions of the module docstring this method has."""
        return {"features": self.features, "pooled": self.pooled}

    def load_pretrained(self, params, shardings, load_run: RunLoader):
        """A fresh run's starting parameters (laid out as ``shardings``); default: ``params`` as initialised."""
        del shardings, load_run
        return params

    def load_frozen(self, frozen, shardings, load_run: RunLoader):
        """A fresh run's frozen parameters (laid out as ``shardings``); default: ``frozen`` as initialised."""
        del shardings, load_run
        return frozen

    def host_state(self, placement: sharding.Placement, global_batch: int) -> HostState | None:
        """The per-image host state of the module docstring; default: None (a sampler that keeps none)."""
        del placement, global_batch
        return None

    def normalize(self, images):
        """``images [..., C]`` uint8 pixels (the pipeline's default) -> float32 normalised per ``config.data``,
        on device; already normalised float images pass through (``data.device_normalize=False``)."""
        data = self.config.data
        return transforms.normalize_images(images, tuple(data.mean), tuple(data.std))

    def example_batch(self, batch_size: int) -> dict:
        """Zeros shaped like ``batch_spec`` (initialisation needs values, not only shapes)."""
        return {k: np.zeros(s.shape, s.dtype) for k, s in self.batch_spec(batch_size).items()}


def load_into(fresh, loaded, shardings, mismatch: Callable[[str, tuple, tuple], str]):
    """``loaded`` (a tree of host arrays with at least ``fresh``'s leaves) laid out as ``fresh`` is: each leaf cast
    to the fresh leaf's dtype and put with its sharding (``shardings``, the tree's). A shape that differs is a
    ``ValueError`` of ``mismatch(name, loaded shape, needed shape)``, the leaf named by its path."""

    def put(path, old, leaf_sharding):
        new = loaded
        for key in path:
            new = new[key.key]
        if np.shape(new) != old.shape:
            raise ValueError(mismatch("/".join(k.key for k in path), np.shape(new), old.shape))
        return jax.device_put(np.asarray(new).astype(old.dtype), leaf_sharding)

    return jax.tree_util.tree_map_with_path(put, fresh, shardings)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What a method module declares (``REGISTRATION``), so that nothing has to be found by convention.

    ``method``: the ``Method`` class, built from a whole experiment config. ``section``: its method section's
    defaults (``default_config(**overrides)``). ``model``: the model section a config's own is held to
    (given that section: a classifier's is a ViT's or a Swin's). ``sections``: the further sections its
    runs read, with their defaults (fine-tuning's ``init`` and ``mixing``, its own ``optimizer``).
    ``placeholders``: method-section keys that let the method be built where its external inputs are absent,
    for tools that only compile it (TEC's teacher checkpoint, whose path nothing reads before a run starts).
    """

    method: type[Method]
    section: Callable[..., ml_collections.ConfigDict]
    model: Callable[[ml_collections.ConfigDict | None], ml_collections.ConfigDict]
    sections: Callable[[], dict] = dict
    placeholders: dict = dataclasses.field(default_factory=dict)


def canonical_section(method: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``method`` with a legacy name (``partial``, ``prmim``) rewritten as its module and overrides."""
    if method.name not in LEGACY_NAMES:
        return method
    module, overrides = LEGACY_NAMES[method.name]
    section = ml_collections.ConfigDict(method.to_dict())
    section.name = module
    section.update(overrides)
    return section


def registration(name: str) -> Registration:
    """The ``Registration`` of method module ``name``; ``ValueError`` (listing the choices) when there is none."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"method.name={name!r} is not a module name; set --config.method.name to one of {available()}."
        )
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        module = None
    if not isinstance(getattr(module, "REGISTRATION", None), Registration):
        match = difflib.get_close_matches(name, available(), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"unknown method {name!r}; choose one of {available()} for --config.method.name{hint}.")
    return module.REGISTRATION


def registered() -> list[str]:
    """The module names under ``prmim_jax/methods`` that declare a ``REGISTRATION`` (the registry is the package)."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "REGISTRATION", None), Registration):
            names.append(info.name)
    return sorted(names)


def available() -> list[str]:
    """Every name ``method.name`` takes: the registered modules and the legacy names."""
    return registered() + sorted(LEGACY_NAMES)


def method_config(name: str = "prmim", **overrides) -> ml_collections.ConfigDict:
    """The method section for ``name`` (a module or a legacy name) with ``overrides``, from the module's defaults."""
    module_name, legacy = LEGACY_NAMES.get(name, (name, {}))
    return registration(module_name).section(**(legacy | overrides))


def build(config: ml_collections.ConfigDict) -> Method:
    """The ``Method`` of an experiment config; raises ``ValueError`` with the fix, before anything compiles."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's config stays as it is
    config.method = canonical_section(config.method)
    return registration(config.method.name).method(config)
