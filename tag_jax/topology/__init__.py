"""Device topologies: devices and links as a graph, and collective pricing on it."""
from tag_jax.topology.collectives import KINDS as COLLECTIVE_KINDS  # noqa: F401
from tag_jax.topology.errors import TopologyError  # noqa: F401
from tag_jax.topology.graph import Device, Link, Topology  # noqa: F401
from tag_jax.topology.hardware import KNOWN_KINDS  # noqa: F401
from tag_jax.topology.presets import PRESETS  # noqa: F401

__all__ = ["Topology", "Device", "Link", "TopologyError", "COLLECTIVE_KINDS", "KNOWN_KINDS",
           "PRESETS"]
