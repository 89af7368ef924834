"""Between the planner's `MeshSpec` (device ids in row-major mesh order) and JAX's `Mesh`.

Emitted programs always use `AxisType.Auto` axes: sharding constraints at planned tensors are hints
to GSPMD, which Explicit axes (the default of `jax.make_mesh`) do not take.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from tag_jax.strategy import MeshSpec


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    """The JAX mesh of `spec`: `devices[spec.device_ids[k]]` at row-major position k, Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    missing = [i for i in spec.device_ids if not 0 <= i < len(devices)]
    if missing:
        raise ValueError(f"mesh {dict(zip(spec.axis_names, spec.shape))} places device ids {missing}, "
                         f"but JAX has only {len(devices)} device(s) (ids 0..{len(devices) - 1}); "
                         "plan for the devices this process sees")
    grid = np.array([devices[i] for i in spec.device_ids], dtype=object).reshape(spec.shape)
    return Mesh(grid, spec.axis_names, axis_types=(AxisType.Auto,) * len(spec.axis_names))


def mesh_spec(mesh: Mesh, devices=None) -> MeshSpec:
    """The `MeshSpec` of a JAX mesh: its axes, and each position's index in `jax.devices()`."""
    devices = list(jax.devices() if devices is None else devices)
    index = {d: k for k, d in enumerate(devices)}
    ids = []
    for d in mesh.devices.flat:
        if d not in index:
            raise ValueError(f"mesh device {d} is not among jax.devices() of this process; "
                             "tag_jax plans meshes over the local process's view of the devices")
        ids.append(index[d])
    return MeshSpec(tuple(int(n) for n in mesh.devices.shape), tuple(mesh.axis_names), tuple(ids))


def reshape_spec(spec: MeshSpec, shape: tuple[int, ...], axis_names: tuple[str, ...]) -> MeshSpec:
    """The same devices in the same order, viewed as a mesh of another shape."""
    if math.prod(shape) != spec.size:
        raise ValueError(f"cannot view a mesh of {spec.size} devices as {dict(zip(axis_names, shape))}")
    return MeshSpec(tuple(shape), tuple(axis_names), spec.device_ids)
