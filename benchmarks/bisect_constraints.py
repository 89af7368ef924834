"""Which planned sharding constraints change a program's values? (A debugging tool.)

Usage: python benchmarks/bisect_constraints.py [model] [seed]   (default: vgg, the known failure)

A sharding constraint is the identity in JAX's semantics, so a sharded program whose values move
when constraints are added points at the SPMD partitioner. This draws the random strategy the
equivalence benchmark failed on, then applies the constraints of one producing primitive at a time,
then one tensor at a time, and prints those that change the results.
"""
from __future__ import annotations

import os
import sys

from tag_jax.models._common import FAST_COMPILE_XLA_FLAGS  # noqa: E402  (see fast_compile_options)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + FAST_COMPILE_XLA_FLAGS)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tag_jax  # noqa: E402
from tag_jax import models, rules  # noqa: E402
from tag_jax.emit import program  # noqa: E402
from tag_jax.plan import Plan  # noqa: E402
from tag_jax.search.random_strategy import random_strategy  # noqa: E402
from tag_jax.strategy import MeshSpec  # noqa: E402


def main(name: str = "vgg", seed: int = 7) -> None:
    ex = models.get(name, "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    ref = jax.tree_util.tree_leaves(jax.jit(ex.step)(state, batch))
    g = tag_jax.trace(ex.step, ex.state, ex.batch)
    mesh = MeshSpec((2, 4), ("x", "y"), tuple(range(8)))
    ops = rules.for_graph(g, mesh.axes)
    s = random_strategy(g, ops, mesh, np.random.default_rng([seed, 0, 1, 1]), mode="uniform")
    everything = program.constraints(g, s, ops)
    original = program.constraints

    def error(keep) -> float:
        program.constraints = lambda *a, **k: {t: v for t, v in everything.items() if keep(t)}
        try:
            out = Plan.build(g, s, ops, cost=None).jit(compiler_options=models.fast_compile_options())(
                state, batch)
        finally:
            program.constraints = original
        return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree_util.tree_leaves(out), ref))

    def prim(t: int) -> str | None:
        p = g.tensors[t].producer
        return None if p is None else g.ops[p].primitive

    print(f"all constraints: {error(lambda t: True):.3g}; none: {error(lambda t: False):.3g}")
    for p in sorted({prim(t) for t in everything} - {None}):
        e = error(lambda t, p=p: prim(t) == p)
        if e > 1e-5:
            print(f"constraints on {p} results alone: {e:.3g}")
            for t in (t for t in everything if prim(t) == p):
                et = error(lambda x, t=t: x == t)
                if et > 1e-5:
                    op = g.ops[g.tensors[t].producer]
                    print(f"  tensor {t} {g.tensors[t].describe()} at {op.scope} -> {everything[t]}: {et:.3g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vgg", int(sys.argv[2]) if len(sys.argv) > 2 else 7)
