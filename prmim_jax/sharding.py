"""The device mesh, the logical-axis rules that map model axes onto it, and the shardings built from them.

Models name logical axes only (``prmim_jax.models.vit``); this module is the one
place that turns them into mesh axes. The config section:

    config.sharding.mesh = (("data", -1), ("fsdp", 1))   # axis sizes; one -1 takes the rest
    config.sharding.rules = (("batch", ("dcn", "data", "fsdp")), ("embed", "fsdp"), ...)

- data parallelism: every device holds the parameters, the batch is split
  over ``data`` (``mesh = (("data", -1), ("fsdp", 1))``);
- FSDP: parameters and optimizer state are split over ``fsdp`` along their
  ``embed`` axis, the batch over ``data`` and ``fsdp`` together
  (``mesh = (("data", 1), ("fsdp", -1))``, or any mix);
- several TPU slices: ``dcn`` (``DCN_AXIS``) counts the slices, which talk over the data-centre network
  (``mesh = (("dcn", 2), ("data", -1), ("fsdp", 1))``): the batch is split over the slices too, and the
  parameters are replicated across them, so only the gradient reduction crosses slices. The device grid
  comes from ``mesh_utils.create_hybrid_device_mesh`` (``device_grid``). A mesh without ``dcn`` is one
  slice: rules that name ``dcn`` then drop it (``Placement.from_config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The mesh axis of the slices of a multi-slice TPU job; a mesh may leave it out (one slice).
DCN_AXIS = "dcn"

# Logical axes of prmim_jax.models and the mesh axes they map to. An axis that is
# absent or maps to None is replicated.
DEFAULT_RULES = (
    ("batch", (DCN_AXIS, "data", "fsdp")),
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


def device_grid(shape: dict[str, int], devices) -> np.ndarray:
    """``devices`` as an array of ``shape`` (``mesh_shape``'s ``{axis: size}``, in mesh order).

    With a ``dcn`` axis of more than one slice, the devices of one slice share an index on that axis
    (``mesh_utils.create_hybrid_device_mesh``, which reads each device's ``slice_index``); every other
    axis runs within a slice. Raises ``ValueError`` naming the fix where the devices carry no
    ``slice_index`` (not a multi-slice TPU job) or their slices do not number ``dcn``."""
    slices = shape.get(DCN_AXIS, 1)
    if slices == 1:
        return np.asarray(devices).reshape(tuple(shape.values()))
    found = {getattr(device, "slice_index", None) for device in devices}
    if None in found:
        raise ValueError(
            f"sharding.mesh has {DCN_AXIS}={slices} slices but the devices have no slice_index (this is not a "
            f"multi-slice TPU job); set the {DCN_AXIS!r} axis to 1, or leave it out, in --config.sharding.mesh."
        )
    if len(found) != slices:
        raise ValueError(
            f"sharding.mesh has {DCN_AXIS}={slices} but the devices lie on {len(found)} slices; set the "
            f"{DCN_AXIS!r} axis of --config.sharding.mesh to {len(found)}."
        )
    within = [1 if name == DCN_AXIS else size for name, size in shape.items()]
    across = [slices if name == DCN_AXIS else 1 for name in shape]
    return mesh_utils.create_hybrid_device_mesh(within, across, devices)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    return Mesh(device_grid(shape, devices), tuple(shape))


def rules(config: ml_collections.ConfigDict):
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.rules)


def rules_on_mesh(logical_rules, mesh: Mesh):
    """``logical_rules`` with the mesh axes ``mesh`` lacks left out (a rule's ``dcn`` on a one-slice mesh:
    ``config_validation.check_sharding`` refuses every other absent axis), so that every rule names only
    axes of ``mesh``."""

    def present(axes):
        if isinstance(axes, tuple):
            kept = tuple(a for a in axes if a in mesh.shape)
            return kept or None
        return axes if axes is None or axes in mesh.shape else None

    return tuple((name, present(axes)) for name, axes in logical_rules)


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
        mesh = make_mesh(config, devices)
        return cls(mesh, rules_on_mesh(rules(config), mesh))

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
