"""The simulator: per-device compute, resharding and gradient collectives priced on the topology,
overlap of communication with compute, and per-device peak memory from tensor lifetimes."""
from tag_jax.cost.reshard import Comm, comm_time, reshard_collectives  # noqa: F401
from tag_jax.cost.simulate import (  # noqa: F401
    COMPUTE_EFFICIENCY, MEMORY_EFFICIENCY, USABLE_MEMORY, Cost, LOWERINGS, Simulator, fits, set_lowering, simulate)
from tag_jax.cost.incremental import Incremental  # noqa: F401
from tag_jax.cost.breakdown import DeviceRow, breakdown, group_rows  # noqa: F401

__all__ = ["Comm", "comm_time", "reshard_collectives", "Cost", "Simulator", "Incremental",
           "simulate", "fits", "breakdown", "group_rows", "DeviceRow", "COMPUTE_EFFICIENCY",
           "MEMORY_EFFICIENCY", "USABLE_MEMORY", "LOWERINGS", "set_lowering"]
