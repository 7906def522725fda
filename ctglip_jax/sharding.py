"""Device mesh and sharding rules (big_vision style, `jax.jit` + `NamedSharding`; no pmap).

The mesh has two named axes: `data` (pure data parallelism: params replicated) and `fsdp` (data parallel
*and* parameters/optimizer state sharded). The batch is split over both axes; a parameter is split over
`fsdp` along its largest dimension divisible by the axis size, so FSDP needs no per-model annotations.
Small parameters (biases, norms) stay replicated: sharding them costs more in collectives than it saves.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ctglip_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every mesh axis
FSDP_MIN_SIZE = 2**14  # parameters with fewer elements are replicated


def make_mesh(mesh_shape: Sequence[tuple[str, int]] | dict | None = None, devices=None) -> Mesh:
    """Build a (data, fsdp) mesh. `mesh_shape` like [('data', -1), ('fsdp', 2)]; -1 takes the rest.

    Missing axes get size 1, so a config can name only `data` and still run the FSDP rules.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(mesh_shape.items() if isinstance(mesh_shape, dict) else (mesh_shape or [("data", -1)]))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ConfigError("config.mesh", f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError("config.mesh", "at most one mesh axis may be -1")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ConfigError("config.mesh", f"{len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ConfigError("config.mesh", f"mesh {sizes} needs {total} devices, {len(devices)} are visible")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the mesh's data axes (`data`, `fsdp`), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ConfigError("<mesh>", f"mesh axes {mesh.axis_names} have no 'data' or 'fsdp' axis")
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def process_example_offset(sharding: NamedSharding, global_batch: int) -> int:
    """Global index of this process's first batch row, checking that its rows are one contiguous block.

    `make_array_from_process_local_data` places a process's local rows on the rows its devices own; index
    arrays into a per-batch table (joint text training) need that block's start to be global indices.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*index[0].indices(global_batch)))
    first = min(rows)
    if sorted(rows) != list(range(first, first + global_batch // jax.process_count())):
        raise ConfigError("config.mesh", "this process's batch rows are not one contiguous block; build "
                                         "the mesh from jax.devices() in order")
    return first


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """PartitionSpec that shards the largest dimension divisible by `fsdp_size` (ties: the last one)."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(mesh: Mesh, abstract_state, min_size: int = FSDP_MIN_SIZE):
    """NamedShardings for every leaf of an abstract (eval_shape) train state under the FSDP rule."""
    fsdp_size = mesh.shape["fsdp"]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

    return jax.tree.map(one, abstract_state)


def with_shardings(abstract_tree, shardings):
    """Attach shardings to ShapeDtypeStructs (what Orbax restores into)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
