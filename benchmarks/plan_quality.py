"""tag_jax vs the hand-written plans: predicted step time per zoo model and topology preset.

Usage: python benchmarks/plan_quality.py [--budget 10] [--ilp-time 10] [--topologies 2x4-v100-25gbe,...]
                                         [--models gpt2:small,...] [--compute-dtype bfloat16]
                                         [--out benchmarks/RESULTS.md]

All plans are priced by the same simulator in the same run: the baselines (data parallel, FSDP,
Megatron on every (data, model) split) are the search's seeds, so each ratio is side by side.
The DP, FSDP and Megatron columns show each plan whether or not it fits in memory; "vs best
baseline" (and the count of cases a baseline wins) is against the best one that fits.
DP, FSDP and Megatron are on all 8 devices; on mixed clusters the best of them on only the faster
devices (the search's meshes that leave the slow kind out; only plans that fit in memory) is a
column of its own and counts among the baselines tag_jax must beat ("vs best baseline"); "vs DP"
is against DP on all devices.
Planning time is the search's wall time on this machine (tracing excluded, reported apart).
Megatron is also priced here apart on every 2-D candidate mesh of all the devices (as the search
would seed it), so that the column is the best Megatron even where the search's budget ran out
before it seeded them all.
The ILP column is the Alpa-style baseline (`tag_jax.search.ilp`) solved on each candidate mesh of
the search (its time limit shared among them), priced by the same simulator; "ILP/tag_jax" > 1
means the annealer's plan is faster. "ILP model s" is the ILP's own objective (no overlap).
"""
from __future__ import annotations

import argparse
import math
import time

import tag_jax
from tag_jax import models
from tag_jax.cost.simulate import USABLE_MEMORY
from tag_jax import rules
from tag_jax.search.anneal import candidate_meshes
from tag_jax.search.ilp import ilp_strategy
from tag_jax.search.planner import PlanningError, search

TOPOLOGIES = "1x8-a100-nvlink,2x4-v100-25gbe,tag-hetero,4xa100-4xv100,tpu-v4-2x2x2"
MODELS = "mlp:real,gpt2:small,bert:base,vit:b16,resnet:50,vgg:19,moe:base,t5:base,recommender:real"


def best_of(seeds: dict, kind: str, n: int, fewer: bool = False, skip=frozenset()) -> float:
    """The best seed of this kind on all n devices (or, `fewer`, on only the faster devices of a
    mixed cluster), leaving out the names in `skip`; a seed's name ends with its mesh, e.g.
    "fsdp (data=4,model=2)"."""
    def size(name: str) -> int:
        return math.prod(int(x.split("=")[1]) for x in name[name.rindex("(") + 1:-1].split(","))

    values = [v for k, v in seeds.items()
              if k.startswith(kind) and (size(k) < n) == fewer and k not in skip]
    return min(values) if values else math.nan


def ilp_best(graph, topo, ids, time_limit_s: float, memory_limit: float) -> dict | None:
    """The ILP on every candidate mesh (Alpa enumerates mesh shapes too); the best simulated plan."""
    meshes = candidate_meshes(ids, topo)
    best, solve_s = None, 0.0
    for mesh in meshes:
        try:
            _, info = ilp_strategy(graph, rules.for_graph(graph, mesh.axes), topo, mesh,
                                   time_limit_s=time_limit_s / len(meshes), memory_limit=memory_limit)
        except PlanningError:
            continue
        solve_s += info["seconds"]
        if best is None or info["step_time_s"] < best["step_time_s"]:
            best = dict(info, mesh=mesh)
    if best is not None:
        best["all_s"] = solve_s
    return best


def megatron_time(graph, topo, ids, memory_limit: float) -> tuple[float, float]:
    """The best Megatron on any 2-D candidate mesh of all of `ids`, as the search seeds it, and
    the best of those that fit in `memory_limit` (nan without one)."""
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    times, fitting = [], []
    for mesh in candidate_meshes(ids, topo):
        if len(mesh.shape) != 2 or len(mesh.device_ids) != len(ids):
            continue
        ops = rules.for_graph(graph, mesh.axes)
        sim = Simulator(graph, ops, topo, mesh, carried=carried_outputs(graph))
        cost = sim.cost(baseline_strategy("megatron", graph, ops, mesh, simulator=sim,
                                          memory_limit=memory_limit))
        times.append(cost.step_time_s)
        if cost.peak_memory_bytes <= memory_limit:
            fitting.append(cost.step_time_s)
    return min(times, default=math.nan), min(fitting, default=math.nan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=10.0, help="search time budget per case, s")
    ap.add_argument("--ilp-time", type=float, default=None,
                    help="ILP time limit per case, shared by the meshes, s (default: --budget)")
    ap.add_argument("--topologies", default=TOPOLOGIES)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--no-policy", action="store_true", help="search unguided (auto_shard(policy=None))")
    ap.add_argument("--no-ilp", action="store_true", help="leave the ILP baseline out (quick runs)")
    ap.add_argument("--compute-dtype", default=None,
                    help="train the zoo in mixed precision, e.g. bfloat16 (models.get(compute_dtype=...))")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tag_jax.policy import resolve

    guide = None if args.no_policy else resolve("default")  # as auto_shard does
    beaten: list[str] = []
    header = ("| model | topology | tag_jax s | DP s | FSDP s | Megatron s | best on faster devices s | vs DP | "
              "vs best baseline | "
              "mesh | peak GiB | trace s | plan s | ILP s | ILP/tag_jax | ILP model s | ILP mesh | ILP status | "
              "ILP solve s |")
    lines = [header, "|" + "---|" * 19]
    ilp_time = args.budget if args.ilp_time is None else args.ilp_time
    print(header, flush=True)
    ratios: dict[str, list[float]] = {}
    for case in args.models.split(","):
        name, size = case.split(":")
        ex = models.get(name, size, compute_dtype=args.compute_dtype)
        t0 = time.perf_counter()
        graph = tag_jax.trace(ex.step, ex.state, ex.batch)
        trace_s = time.perf_counter() - t0
        for topo_name in args.topologies.split(","):
            topo = tag_jax.Topology.preset(topo_name)
            ids = list(range(min(8, topo.num_devices)))
            limit = USABLE_MEMORY * min(topo.device_memory(i) for i in ids)
            t0 = time.perf_counter()
            try:
                r = search(graph, topo, ids, time_budget_s=args.budget, memory_fraction=USABLE_MEMORY,
                           policy=guide)  # as auto_shard: each mesh its own devices' memory
            except PlanningError as exc:
                line = f"| {name}-{size} | {topo_name} | no plan fits: {str(exc)[:80]}… |" + " |" * 16
                lines.append(line)
                print(line, flush=True)
                continue
            plan_s = time.perf_counter() - t0
            dp, fsdp, meg = (best_of(r.seeds, k, len(ids)) for k in ("data_parallel", "fsdp", "megatron"))
            # the same hand-written plans on only the faster devices of a mixed cluster
            # (only plans that fit: on a few devices the state and activations of a whole batch may not)
            fewer = min((best_of(r.seeds, k, len(ids), fewer=True, skip=r.over_memory)
                         for k in ("data_parallel", "fsdp", "megatron")),
                        key=lambda v: v if v == v else math.inf)
            # every 2-D mesh, also those the search's budget ran out before seeding
            apart, apart_fits = megatron_time(graph, topo, ids, limit)
            meg_fit = min((v for v in (best_of(r.seeds, "megatron", len(ids), skip=r.over_memory),
                                       apart_fits) if v == v), default=math.nan)
            meg = min((v for v in (meg, apart) if v == v), default=math.nan)
            ours = r.cost.step_time_s
            # the baseline to beat: the best hand-written plan that fits (the columns show them all)
            fit = [best_of(r.seeds, k, len(ids), skip=r.over_memory) for k in ("data_parallel", "fsdp")]
            best_base = min(v for v in (*fit, meg_fit, fewer) if v == v)
            ratios.setdefault(topo_name, []).append(dp / ours)
            mesh = ",".join(f"{a}={n}" for a, n in r.strategy.mesh.axes.items())
            line = (f"| {name}-{size} | {topo_name} | {ours:.4f} | {dp:.4f} | {fsdp:.4f} | {meg:.4f} | "
                    f"{'-' if fewer != fewer else f'{fewer:.4f}'} | "
                    f"{dp / ours:.2f}x | {best_base / ours:.2f}x | {mesh} | "
                    f"{r.cost.peak_memory_bytes / 2**30:.2f} | {trace_s:.2f} | {plan_s:.1f} |")
            ilp = None if args.no_ilp else ilp_best(graph, topo, ids, ilp_time, limit)
            if ilp is None:
                line += (" (not run) | | | | | |" if args.no_ilp else " no ILP plan fits | | | | | |")
            else:
                ilp_mesh = ",".join(f"{a}={n}" for a, n in ilp["mesh"].axes.items())
                line += (f" {ilp['step_time_s']:.4f} | {ilp['step_time_s'] / ours:.2f}x | "
                         f"{ilp['objective_s']:.4f} | {ilp_mesh} | {ilp['status']} | {ilp['all_s']:.1f} |")
            if best_base < ours * (1 - 1e-9):
                beaten.append(f"{case} on {topo_name}: best hand-written plan {best_base:.4g} s < "
                              f"tag_jax {ours:.4g} s")
            if ilp is not None and ilp["step_time_s"] < ours * (1 - 1e-9):
                beaten.append(f"{case} on {topo_name}: ILP {ilp['step_time_s']:.4g} s < tag_jax {ours:.4g} s")
            lines.append(line)
            print(line, flush=True)
    summary = ["", f"Cases where a baseline's plan (ILP included) is faster than tag_jax's: {len(beaten)}"]
    summary += [f"- {b}" for b in beaten]
    summary += ["", "Geometric-mean speed-up over data parallel (DP times include plans that do not "
               "fit in memory; the search only returns plans that fit):"]
    for topo_name, rs in ratios.items():
        summary.append(f"- {topo_name}: {math.exp(sum(map(math.log, rs)) / len(rs)):.2f}x "
                       f"(max {max(rs):.2f}x over {len(rs)} models)")
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Plan quality: predicted step time, tag_jax vs hand-written plans\n\nCommand: "
                    f"`python benchmarks/plan_quality.py --budget {args.budget} --ilp-time {ilp_time} "
                    f"{'--no-policy ' if args.no_policy else ''}"
                    f"{f'--compute-dtype {args.compute_dtype} ' if args.compute_dtype else ''}"
                    f"{f'--topologies {args.topologies} ' if args.topologies != TOPOLOGIES else ''}"
                    f"{f'--models {args.models} ' if args.models != MODELS else ''}"
                    f"--out {args.out}` "
                    "(8 devices of each preset; simulator prices; 2-core machine)\n\n")
            f.write("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
