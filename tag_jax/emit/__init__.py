"""Emission: a strategy becomes a `jax.jit` program with shardings and planned constraints."""
from tag_jax.emit.mesh import make_mesh, mesh_spec, reshape_spec  # noqa: F401
from tag_jax.emit.program import (  # noqa: F401
    EmitError, check, chosen, constraints, emit, output_shardings, produced_shardings)

__all__ = ["emit", "EmitError", "make_mesh", "mesh_spec", "reshape_spec", "check", "chosen",
           "constraints", "output_shardings", "produced_shardings"]
