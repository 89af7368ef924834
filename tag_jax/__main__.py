"""`python -m tag_jax`: the main job on a bundled example.

Traces a zoo training step, shows its op graph and the cluster it is planned for, and (once the
planner's pieces are present) prices the hand-written baseline plans on that cluster.
Runs on 8 simulated CPU devices unless the environment already chose devices.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _simulated_devices(n: int) -> None:
    # Only this entry point does this; importing tag_jax never touches XLA_FLAGS (house rule 5).
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tag_jax", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="zoo model (see tag_jax.models.names())")
    ap.add_argument("--size", default="small", help="model size, e.g. toy, small, base, real")
    ap.add_argument("--topology", default="2x4-v100-25gbe", help="preset name or JSON file")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices when none are set")
    args = ap.parse_args(argv)
    _simulated_devices(args.devices)

    import tag_jax
    from tag_jax import models

    try:
        example = models.get(args.model, args.size)
        topology = (tag_jax.Topology.from_json(args.topology) if args.topology.endswith(".json")
                    else tag_jax.Topology.preset(args.topology))
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    graph = tag_jax.trace(example.step, example.state, example.batch, name=f"{args.model}-{args.size}")
    print(f"{example.description}\n{example.param_count:,} parameters; traced in "
          f"{time.perf_counter() - t0:.2f} s on abstract inputs\n")
    print(graph.summary())
    print()
    print(topology.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
