"""`tag-jax topology`: list the presets, show one topology, or validate a JSON topology file."""
from __future__ import annotations

import argparse

from tag_jax.cli import inputs

NAME = "topology"
HELP = "list topology presets, show one (preset or JSON file), or validate a JSON file"
DESCRIPTION = """\
Without arguments, list the topology presets. With a preset name or a JSON file, show its devices
(kind, FLOP/s, memory) per node and its links; --json prints it as JSON instead, a starting point
for describing your own cluster. --validate FILE checks a JSON topology file and prints OK, or the
field at fault; the exit status is 0 when the file is valid and 1 when it is not."""


def epilog() -> str:
    return """examples:
  tag-jax topology                                   # the presets
  tag-jax topology 2x4-v100-25gbe                    # one of them
  tag-jax topology 2x4-v100-25gbe --json > mine.json # edit it, then:
  tag-jax topology --validate mine.json

JSON format (units: FLOP/s, bytes, bytes/s per direction, seconds):
  {"name": "my-cluster", "devices": [{"kind": "v100", "node": 0}, ...],
   "intra_node": {"bandwidth": 1.5e11, "latency": 2e-6},
   "inter_node": {"bandwidth": 3.125e9, "latency": 1e-5, "nics": 1}}
Device figures default from the known kinds; device i stands for jax.devices()[i]."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="PRESET|FILE.json",
                   help="a preset name or a JSON topology file to show")
    p.add_argument("--validate", metavar="FILE", help="check a JSON topology file")
    p.add_argument("--json", action="store_true", help="print the topology as JSON")


def run(args: argparse.Namespace) -> int:
    from tag_jax.topology import Topology, TopologyError

    if args.validate is not None:
        if args.source is not None:
            raise inputs.CLIError("give either a topology to show or --validate FILE, not both")
        try:
            topo = Topology.from_json(args.validate)
        except TopologyError as exc:  # a verdict, not a usage error: exit 1 like a failed check
            raise inputs.CLIError(str(exc), status=1) from None
        print(f"OK: {args.validate}: topology '{topo.name}', {topo.num_devices} devices on "
              f"{len(topo.nodes)} node(s), fingerprint {topo.fingerprint()[:12]}")
        return 0
    if args.source is None:
        presets = Topology.presets()
        width = max(map(len, presets))
        print("topology presets (tag-jax topology NAME shows one):")
        for name, description in presets.items():
            print(f"  {name:<{width}}  {description}")
        return 0
    topo = inputs.load_topology(args.source)
    print(topo.to_json() if args.json else topo.summary())
    return 0
