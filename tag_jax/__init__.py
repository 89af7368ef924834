"""tag_jax: a topology-aware sharding planner for JAX training steps.

The public surface is what this module re-exports; everything else may change.
"""
from tag_jax import baselines, compress, export, hlo, models, uneven  # noqa: F401
from tag_jax.api import auto_shard
from tag_jax.hlo import OpGraph, Role, TraceError, trace
from tag_jax.plan import Plan, PlanMismatchError
from tag_jax.search.planner import PlanningError
from tag_jax.topology import Topology, TopologyError

__all__ = ["auto_shard", "Plan", "PlanMismatchError", "PlanningError", "baselines", "compress", "export", "hlo", "models", "uneven",
           "trace", "OpGraph",
           "Role", "TraceError", "Topology", "TopologyError"]
__version__ = "0.1.0"
