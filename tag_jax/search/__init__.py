"""Search over strategies. `propagate` is the greedy forward choice used by baselines and as a seed."""
from tag_jax.search.propagate import carried_outputs, parallelism, propagate, reshard_bytes  # noqa: F401

__all__ = ["propagate", "carried_outputs", "reshard_bytes", "parallelism"]
