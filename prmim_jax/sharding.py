"""The device mesh, the logical-axis rules that map model axes onto it, and the shardings built from them.

Models name logical axes only (``prmim_jax.models.vit``); this module is the one
place that turns them into mesh axes. The config section:

    config.sharding.mesh = (("data", -1), ("fsdp", 1))   # axis sizes; one -1 takes the rest
    config.sharding.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ...)

- data parallelism: every device holds the parameters, the batch is split
  over ``data`` (``mesh = (("data", -1), ("fsdp", 1))``);
- FSDP: parameters and optimizer state are split over ``fsdp`` along their
  ``embed`` axis, the batch over ``data`` and ``fsdp`` together
  (``mesh = (("data", 1), ("fsdp", -1))``, or any mix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes of prmim_jax.models and the mesh axes they map to. An axis that is
# absent or maps to None is replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("tokens", None),
    ("decoder_embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("patch", None),
)


def sharding_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(mesh=(("data", -1), ("fsdp", 1)), rules=DEFAULT_RULES))
    config.update(overrides)
    return config


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
    """``{axis: size}`` with the ``-1`` axis resolved; raises ``ValueError`` unless it tiles ``device_count``."""
    names = [name for name, _ in config.mesh]
    sizes = [int(size) for _, size in config.mesh]
    if sizes.count(-1) > 1:
        raise ValueError(f"sharding.mesh={config.mesh}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(
                f"sharding.mesh={config.mesh} cannot tile {device_count} devices: {device_count} % {known} != 0."
            )
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"sharding.mesh={config.mesh} has {math.prod(sizes)} devices but {device_count} are present; use -1 for one axis."
        )
    return dict(zip(names, sizes, strict=True))


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    grid = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(grid, tuple(shape))


def rules(config: ml_collections.ConfigDict):
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.rules)


def batch_axes(mesh: Mesh, logical_rules) -> tuple[str, ...]:
    axes = dict(logical_rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, logical_rules) -> NamedSharding:
    """Leading (batch) axis split over the mesh axes that ``batch`` maps to, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, logical_rules)))


def batch_divisor(mesh: Mesh, logical_rules) -> int:
    """How many ways the global batch is split: the product of the batch mesh axes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, logical_rules))


def tree_shardings(abstract_boxed_tree, mesh: Mesh, logical_rules):
    """``NamedSharding`` for every leaf of a tree whose leaves may carry logical axis names.

    ``abstract_boxed_tree`` is the ``jax.eval_shape`` of a function returning
    ``nn.LogicallyPartitioned`` leaves (e.g. a train state built from
    ``model.init``); the result has the structure of the unboxed tree.
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def global_batch(local_batch, sharding: NamedSharding):
    """A tree of each process's ``[b, ...]`` numpy arrays -> global ``jax.Array``s ``[b * processes, ...]`` on the mesh."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: the mesh and the logical-axis rules, what methods and evaluators are given
    to lay out their batches and run their programs (never the trainer's own set-up)."""

    mesh: Mesh
    rules: tuple

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices=None) -> Placement:
        """The mesh and rules of a ``sharding`` section (``devices``: the mesh's, default ``jax.devices()``)."""
        return cls(make_mesh(config, devices), rules(config))

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    @property
    def batch_divisor(self) -> int:
        return batch_divisor(self.mesh, self.rules)

    @contextlib.contextmanager
    def active(self):
        """The mesh and the logical-axis rules in effect, for tracing and running a program on them."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def global_batch(self, local_batch):
        """``global_batch`` of this placement's batch sharding."""
        return global_batch(local_batch, self.batch_sharding)
