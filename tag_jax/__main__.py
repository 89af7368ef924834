"""`python -m tag_jax`: plan a bundled example and check the plan against the compiler.

Traces a zoo training step on abstract inputs, shows its op graph and the cluster, runs the planner
(`auto_shard`), compares its predicted step time with the hand-written plans priced by the same
simulator, then compiles the plan (without running it) and compares the collectives XLA emitted with
the predicted ones. Runs on 8 simulated CPU devices unless the environment already chose devices.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tag_jax", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="zoo model (see tag_jax.models.names())")
    ap.add_argument("--size", default="small", help="model size, e.g. toy, small, base, real")
    ap.add_argument("--topology", default="2x4-v100-25gbe", help="preset name or JSON file")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices when none are set")
    ap.add_argument("--budget", type=float, default=7.0, help="search time budget, seconds")
    ap.add_argument("--save", default="plan.json", help="where to save the plan (JSON)")
    args = ap.parse_args(argv)
    from tag_jax.cli import simulated_devices  # only entry points set XLA_FLAGS (house rule 5)

    simulated_devices(args.devices)

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
    print()

    import jax

    devices = jax.devices()[:topology.num_devices]
    step = tag_jax.auto_shard(example.step, devices, topology=topology, time_budget_s=args.budget,
                              progress=True)
    t0 = time.perf_counter()
    plan = step.plan(example.state, example.batch)
    plan_s = time.perf_counter() - t0
    result = plan.search
    print(f"\nplanned in {plan_s:.1f} s ({result.evaluations:,} evaluations); predicted step times:")
    ours = plan.cost.step_time_s
    for name, t in sorted(result.seeds.items(), key=lambda kv: kv[1]):
        print(f"  {name:<38} {t * 1e3:9.2f} ms   tag_jax is {t / ours:5.2f}x faster")
    print(f"  {'tag_jax: ' + plan.strategy.name:<38} {ours * 1e3:9.2f} ms\n")
    print(_head(plan.summary(), 40))
    plan.save(args.save)
    print(f"\nsaved the plan to {args.save}; compiling it to check the prediction ...")
    compiled = step.lower(example.state, example.batch).compile()
    real = tag_jax.hlo.collective_bytes_by_kind(tag_jax.hlo.collectives(compiled))
    predicted = plan.cost.comm_bytes_by_kind
    print(f"  {'collective':<20} {'predicted':>14} {'compiled':>14}  (bytes per device)")
    for kind in sorted(set(real) | set(predicted)):
        if real.get(kind, 0) or predicted.get(kind, 0):
            print(f"  {kind:<20} {predicted.get(kind, 0):>14,.0f} {real.get(kind, 0):>14,.0f}")
    memory = tag_jax.hlo.compiled_memory(compiled)["peak"]
    print(f"  {'peak memory':<20} {plan.cost.peak_memory_bytes:>14,.0f} {memory:>14,.0f}")
    return 0


def _head(text: str, n: int) -> str:
    lines = text.splitlines()
    if len(lines) <= n:
        return text
    return "\n".join(lines[:n // 2] + [f"  ... {len(lines) - n} more lines (plan.summary()) ..."]
                     + lines[-n // 2:])


if __name__ == "__main__":
    sys.exit(main())
