"""tag_jax: a topology-aware sharding planner for JAX training steps.

The public surface is what this module re-exports; everything else may change.
"""
from tag_jax import hlo
from tag_jax.hlo import OpGraph, Role, TraceError, trace
from tag_jax.topology import Topology, TopologyError

__all__ = ["hlo", "trace", "OpGraph", "Role", "TraceError", "Topology", "TopologyError"]
__version__ = "0.1.0"
