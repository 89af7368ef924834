"""Op graphs of the zoo at real size: op count, FLOPs and memory traffic vs XLA's cost_analysis, trace time.

Usage: python benchmarks/trace_flops.py [--models gpt2,bert] [--no-compile] [--out benchmarks/TRACE.md]

For each model and real size the step is traced on abstract inputs (nothing allocated), then compiled
for one device on the same abstract inputs, and our FLOP count is compared with
`compiled.cost_analysis()["flops"]` (per device, per module; XLA counts transcendentals apart).
Memory traffic: the bytes the simulator's roofline charges the unsharded step
(`tag_jax.cost.simulate.memory_traffic`: each op's operands and results, less those XLA's fusion
keeps out of memory, by XLA:CPU's fusion rules here) vs `cost_analysis()["bytes accessed"]`, and
what every op alone would move (no fusion: the simulator's charge before fusion was modelled).
"""
from __future__ import annotations

import argparse
import time

import jax

import tag_jax
from tag_jax import models
from tag_jax.cost.simulate import memory_traffic
from tag_jax.hlo import compiled_flops


def rows(names, compile_step):
    for name in names:
        for size in models.sizes(name):
            if size == "toy":
                continue
            ex = models.get(name, size)
            t0 = time.perf_counter()
            graph = tag_jax.trace(ex.step, ex.state, ex.batch)
            trace_s = time.perf_counter() - t0
            xla, xla_bytes, compile_s = float("nan"), float("nan"), float("nan")
            if compile_step:
                t0 = time.perf_counter()
                compiled = jax.jit(ex.step).lower(ex.state, ex.batch).compile()
                compile_s = time.perf_counter() - t0
                xla = compiled_flops(compiled)
                xla_bytes = compiled_bytes(compiled)
            moved = memory_traffic(graph, "xla-cpu")
            yield dict(model=name, size=size, params=ex.param_count, ops=len(graph.ops), flops=graph.flops,
                       xla=xla, ratio=graph.flops / xla if xla == xla else float("nan"),
                       bytes=moved, xla_bytes=xla_bytes, unfused=sum(op.bytes for op in graph.ops),
                       trace_s=trace_s, compile_s=compile_s)


def compiled_bytes(compiled) -> float:
    """`cost_analysis()["bytes accessed"]`, summed over modules (per device, loop bodies once)."""
    ca = compiled.cost_analysis()
    parts = [ca] if isinstance(ca, dict) else list(ca or [])
    return sum(float(p.get("bytes accessed", 0.0)) for p in parts if p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--no-compile", action="store_true", help="skip the XLA comparison")
    ap.add_argument("--out", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args()
    header = ("| model | size | params | ops | FLOPs (tag_jax) | FLOPs (XLA) | ratio | bytes (tag_jax, fused) | "
              "bytes accessed (XLA) | ratio | bytes, no fusion | ratio | trace s | compile s |")
    lines = [header, "|" + "---|" * 14]
    print(header, flush=True)
    for r in rows(args.models.split(","), not args.no_compile):
        line = (f"| {r['model']} | {r['size']} | {r['params']:,} | {r['ops']:,} | {r['flops']:.4g} | "
                f"{r['xla']:.4g} | {r['ratio']:.3f} | {r['bytes']:.4g} | {r['xla_bytes']:.4g} | "
                f"{r['bytes'] / r['xla_bytes']:.2f} | {r['unfused']:.4g} | {r['unfused'] / r['xla_bytes']:.2f} | "
                f"{r['trace_s']:.2f} | {r['compile_s']:.1f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Zoo op graphs vs XLA cost_analysis\n\nCommand: `python benchmarks/trace_flops.py "
                    f"--out {args.out}` (jax {jax.__version__}, 1 CPU device compile)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
