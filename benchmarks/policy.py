"""The learned policy on models and topologies it never saw in training (predicted step times).

Usage: python benchmarks/policy.py [--budget-s 4] [--evals 60] [--out benchmarks/POLICY.md]
                                  [--held-out {toy,medium}]
       python benchmarks/policy.py --compare A.npz B.npz   # (c): two weight files, zero-shot

Held out (see tag_jax.policy.zoo): the t5 and resnet families, which training never draws, and a
3-layer gpt2 and a 6-layer mlp of sizes outside the training grid; the presets tag-hetero,
4xa100-4xv100, tpu-v4-2x2x2 (a torus, unlike any training topology) and 2x8-v100-p3.
`--held-out medium` swaps the models for `zoo.HELD_OUT_MEDIUM` (same families, larger batch and
width, so that compute per device matters and the replicated plan is not near-best); the
topologies are the same.

(a) zero-shot: the policy's plan alone (`search(..., time_budget_s=0, policy=...)`: features, one
    network call over every candidate mesh, three readings of its scores and the hand-written
    baselines (data parallel, FSDP, Megatron on 2-D meshes, the replicated plan) priced on each of
    the three meshes whose seeds its ranking head scores highest, the fastest kept; no search
    moves; its simulator evaluations are counted
    in the `policy alone evals` column) against the full unguided search
    (`time_budget_s=--budget-s`) and data parallel;
(b) guided vs unguided search, counted in simulator evaluations: every pricing of a plan (a seed,
    a decision vector) and every priced move of op-option annealing (`anneal_ops`, incremental)
    counts one. Unguided: the planner's seeds without the ILP (data parallel and FSDP on each 1-D
    mesh, Megatron on each 2-D mesh, the replicated plan once per set of devices:
    `features.seed_candidates`, in the planner's order; the planner's candidate meshes, those of
    the faster devices only included), then op-option annealing from the best
    of them for the rest of the budget. Guided: the seed the policy's ranking head puts first,
    the policy's two plans on that seed's mesh (its op options; its argument shardings
    propagated), then the other seeds in the ranking's order (the same seeds), then op-option
    annealing from the best start with the policy's move prior. Reported: evaluations until
    within 2% of the unguided best, and the best of each at the same budget (--evals).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

import tag_jax
from tag_jax import models
from tag_jax.policy import Policy, zoo
from tag_jax.policy.features import seed_candidates
from tag_jax.policy.teacher import mesh_problem, seed_strategy
from tag_jax.search.anneal import anneal_ops, candidate_meshes
from tag_jax.search.planner import search


HELD_OUT_SETS = {"toy": zoo.HELD_OUT_MODELS, "medium": zoo.HELD_OUT_MEDIUM}


def held_out(which: str = "toy"):
    """(label, graph, topology name, topology) for every held-out case of the set `which`."""
    for name, size, cfg in HELD_OUT_SETS[which]:
        ex = models.get(name, size, **cfg)
        graph = tag_jax.trace(ex.step, ex.state, ex.batch)
        label = f"{name} " + (",".join(f"{k}={v}" for k, v in cfg.items())
                              if name in ("gpt2", "mlp") or which != "toy" else size)
        for tname in zoo.HELD_OUT_TOPOLOGIES:
            yield label, graph, tname, tag_jax.Topology.preset(tname)


def _priced(ann, strategy, limit) -> float:
    cost = ann.sim.cost(strategy)
    return cost.step_time_s if cost.peak_memory_bytes <= limit else math.inf


def search_curve(graph, problems, limit: float, evals: int, guide=None, seed: int = 0) -> list[float]:
    """Best-so-far step time after each simulator evaluation (see the module docstring)."""
    trace: list[float] = []
    starts = []  # (score, order, mesh index, strategy)

    def add(score, k, strategy):
        trace.append(min(score, trace[-1]) if trace else score)
        starts.append((score, len(starts), k, strategy))

    def price_seed(k, kind):
        ann = problems[k][0]
        plan = seed_strategy(kind, graph, ann.op_strategies, ann.mesh, ann.sim, limit)
        add(_priced(ann, plan, limit), k, plan)

    # the planner's order: its meshes in turn, the replicated plan once per set of devices
    order = seed_candidates([ann.mesh for ann, _ in problems])
    guides = None
    if guide is not None:
        # the seed the policy ranks first, its two plans on that seed's mesh, the other seeds in
        # the policy's order
        guides, ranking = guide
        ranked = [(k, kind) for k, kind, _ in ranking]
        order = ranked + [s for s in order if s not in ranked]  # (none left out: a check)
        k = order[0][0]
        price_seed(*order.pop(0))
        ann = problems[k][0]
        plan = guides[k].strategy(graph)
        add(_priced(ann, plan, limit), k, plan)
        score, _, strategy = ann.evaluate(guides[k].decision)
        add(score, k, strategy)
    for k, kind in order:
        price_seed(k, kind)
    score, _, k, start = min(starts, key=lambda s: s[:2])
    ann = problems[k][0]
    prior = guides[k].op_prior if guides is not None else None
    left = evals - len(trace)
    # anneal_ops is deterministic given its generator: the run stopped after m moves is the first
    # m moves of a longer one, so its result is the best after m evaluations
    grid = sorted(set(list(range(1, min(left, 20) + 1)) + list(range(20, left + 1, 5)) + [left]))
    done, best = 0, trace[-1]
    for m in grid:
        if m <= 0:
            continue
        _, cost, moves = anneal_ops(ann.sim, start, time.perf_counter() + 60,
                                    np.random.default_rng(seed), memory_limit=limit, prior=prior,
                                    max_moves=m)
        fits = cost.peak_memory_bytes <= limit
        value = cost.step_time_s if fits else math.inf
        trace += [best] * (m - done - 1)
        best = min(best, value)
        trace.append(best)
        done = m
    return trace[:evals]


def zero_shot(policy, graph, topo) -> tuple[float, float, int, str]:
    """Step time, seconds, simulator evaluations and name of the policy's plan alone."""
    t0 = time.perf_counter()
    r = search(graph, topo, list(topo.ids), time_budget_s=0, policy=policy)
    return r.cost.step_time_s, time.perf_counter() - t0, r.evaluations, r.strategy.name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=4.0)
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/POLICY.md")
    ap.add_argument("--held-out", choices=tuple(HELD_OUT_SETS), default="toy",
                    help="the held-out model set: toy (zoo.HELD_OUT_MODELS) or medium "
                         "(zoo.HELD_OUT_MEDIUM); the topologies are the same")
    ap.add_argument("--weights", default=None, help="weights to test (default: the shipped ones)")
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="only the cases whose 'model topology' contains TEXT (a timing check)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="only compare two weight files' zero-shot plans on the held-out cases")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare, which=args.held_out)
    policy = Policy.load(args.weights) if args.weights else Policy.load()
    rows = []
    for label, graph, tname, topo in held_out(args.held_out):
        if args.only is not None and args.only not in f"{label} {tname}":
            continue
        ids = list(topo.ids)
        alone, t_alone, alone_evals, alone_plan = zero_shot(policy, graph, topo)
        full = search(graph, topo, ids, time_budget_s=args.budget_s, policy=None)
        dp = min(v for k, v in full.seeds.items() if k.startswith("data_parallel"))
        meshes = candidate_meshes(ids, topo, leave_out=True)  # the planner's meshes
        limit = 0.9 * min(d.memory for d in topo.devices)
        problems = [mesh_problem(graph, topo, m, limit) for m in meshes]
        guide = policy.assess(graph, topo, meshes)
        plain = search_curve(graph, problems, limit, args.evals)
        guided = search_curve(graph, problems, limit, args.evals, guide)
        target = min(plain) * 1.02
        reach = lambda c: next((i + 1 for i, v in enumerate(c) if v <= target), math.inf)  # noqa: E731
        row = dict(model=label, topology=tname, policy=alone, search=full.cost.step_time_s,
                   search_plan=full.strategy.name, dp=dp, policy_s=t_alone,
                   policy_evals=alone_evals, policy_plan=alone_plan,
                   plain_reach=reach(plain), guided_reach=reach(guided),
                   plain_best=min(plain[:args.evals]), guided_best=min(guided[:args.evals]))
        rows.append(row)
        print(f"{label:<40} {tname:<14} policy/search {row['policy'] / row['search']:.3f} "
              f"policy/dp {row['policy'] / dp:.3f}  evals to 2%: {row['plain_reach']} vs "
              f"{row['guided_reach']}  equal-budget guided/plain "
              f"{row['guided_best'] / row['plain_best']:.3f}", file=sys.stderr, flush=True)
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    write(rows, args, policy)


def compare(a: str, b: str, which: str = "toy") -> None:
    """(c): the zero-shot plans of two weight files on every held-out case of the set `which`."""
    pa, pb = Policy.load(a), Policy.load(b)
    ratios = []
    for label, graph, tname, topo in held_out(which):
        ta = zero_shot(pa, graph, topo)[0]
        tb = zero_shot(pb, graph, topo)[0]
        ratios.append(tb / ta)
        print(f"{label[:40]:<40} {tname:<14} A {ta * 1e3:8.3f} ms  B {tb * 1e3:8.3f} ms  B/A {tb / ta:.3f}")
    print(f"B/A zero-shot step time: median {statistics.median(ratios):.3f}, geometric mean "
          f"{math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f}, best {min(ratios):.3f}, "
          f"worst {max(ratios):.3f}, within 5% in {sum(abs(r - 1) <= 0.05 for r in ratios)}/{len(ratios)}")


def write(rows, args, policy) -> None:
    ratio = [r["policy"] / r["search"] for r in rows]
    vs_dp = [r["policy"] / r["dp"] for r in rows]
    speed = [r["plain_reach"] / r["guided_reach"] for r in rows]
    equal = [r["guided_best"] / r["plain_best"] for r in rows]
    kept = sum(not r["policy_plan"].startswith("tag_jax (policy") for r in rows)  # a baseline's plan
    which = args.held_out
    flag = "" if which == "toy" else f" --held-out {which}"
    models_var = "HELD_OUT_MODELS" if which == "toy" else f"HELD_OUT_{which.upper()}"
    lines = [
        f"# The learned policy on held-out models and topologies ({which} held-out set)",
        "",
        f"Command: `python benchmarks/policy.py{flag} --budget-s {args.budget_s:g} --evals {args.evals} "
        f"--out {args.out}` "
        f"(weights: {policy.meta.get('problems', '?')} searched training problems and "
        f"{policy.meta.get('seed_problems', 0)} with priced seeds only, "
        f"teacher {policy.meta.get('teacher', '?')}, feature schema {policy.meta.get('schema', '?')}). "
        "All times are the simulator's predicted step times; none of these models, sizes or "
        f"topologies was drawn in training (models: `tag_jax.policy.zoo.{models_var}`; topologies: "
        "`tag_jax.policy.zoo.HELD_OUT_TOPOLOGIES`). Raw rows: "
        f"`{args.out.rsplit('.', 1)[0] + '.json'}`.",
        "",
        "| model | topology | policy alone (ms) | policy alone evals | full search (ms) | "
        "data parallel (ms) | policy / search | policy / DP | evals to 2%: unguided | guided | "
        "guided / unguided at equal budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['topology']} | {r['policy'] * 1e3:.3f} | {r['policy_evals']} | "
                     f"{r['search'] * 1e3:.3f} | "
                     f"{r['dp'] * 1e3:.3f} | {r['policy'] / r['search']:.3f} | {r['policy'] / r['dp']:.3f} | "
                     f"{r['plain_reach']} | {r['guided_reach']} | {r['guided_best'] / r['plain_best']:.3f} |")
    lines += [
        "",
        f"- zero-shot, policy / full search: median {statistics.median(ratio):.3f}, worst {max(ratio):.3f} "
        f"(target: median within 1.15); policy beats data parallel in "
        f"{sum(v < 1 for v in vs_dp)}/{len(rows)} cases (target: all), ties (within 0.1%) in "
        f"{sum(abs(v - 1) < 1e-3 for v in vs_dp)}.",
        f"- evaluations to reach within 2% of the unguided best, unguided / guided: median "
        f"{statistics.median(speed):.2f}x (target: >= 5x); guided never reached it in "
        f"{sum(math.isinf(r['guided_reach']) for r in rows)} cases.",
        f"- best at an equal budget of {args.evals} evaluations, guided / unguided: median "
        f"{statistics.median(equal):.3f}, worst {max(equal):.3f} (below 1: guided is better; "
        f"worse in {sum(e > 1 + 1e-9 for e in equal)} cases).",
        f"- the policy's plan alone takes {statistics.median(r['policy_s'] for r in rows):.2f} s "
        f"and {statistics.median(r['policy_evals'] for r in rows):g} simulator evaluations median "
        f"({min(r['policy_evals'] for r in rows)}-{max(r['policy_evals'] for r in rows)}; features and "
        "one network call over every candidate mesh, then three readings and the baselines priced "
        "on each of the three meshes whose seeds it ranks highest, data parallel, FSDP and the "
        "replicated plan once per set of devices; the first call of a padded shape compiles the "
        "network); "
        f"a baseline's plan is the one kept in {kept} cases.",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
