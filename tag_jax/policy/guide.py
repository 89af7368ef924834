"""Using a trained policy: scores for the search, and the policy's own plan.

`Policy.guide(graph, topology, meshes)` runs the network once over every candidate mesh (one padded
batch) and returns, per mesh, the decision vector it prefers (argument shardings), the option it
prefers for every op class, per-unit option probabilities for both (the annealers' move priors) and
a mesh logit; `Policy.assess` also ranks the hand-written seeds of every mesh (which to price
first). `policy_plan` prices the policy's plan on the MESHES_TRIED meshes it ranks first, three
readings each (its op options with its argument shardings; the same made consistent by propagation;
its argument shardings with op options propagated as the annealer does), and beside them the
hand-written baselines (data parallel, FSDP, Megatron on 2-D meshes) on the same meshes, and
returns the fastest that fits: a few dozen simulator evaluations at most, no search moves.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

import numpy as np

from tag_jax.policy import features, store


@dataclasses.dataclass(frozen=True)
class Guide:
    mesh: object  # MeshSpec
    decision: tuple[int, ...]  # argmax option of every unit (param groups, then the batch)
    prior: tuple[np.ndarray, ...]  # per unit, probabilities over its options
    mesh_logit: float
    value: float  # predicted log(best / data-parallel step time) on this mesh
    op_choices: tuple[int, ...] = ()  # argmax option of every op class (features.Context.classes)
    op_prior: tuple[np.ndarray, ...] = ()  # per op class, probabilities over its options
    context: object = None  # the features.Context the scores are for

    def strategy(self, graph, name: str = "policy"):
        """The policy's plan: its argument shardings and its option for every op (ops of no class
        have one option)."""
        from tag_jax.strategy import Strategy

        ctx = self.context
        storage, _ = features.input_shardings(graph, ctx.groups, ctx.batch_sets, self.decision)
        choices = [0] * len(graph.ops)
        for members, k in zip(ctx.classes, self.op_choices):
            for i in members:
                choices[i] = k
        return Strategy(self.mesh, tuple(choices), storage, name=name)

    def propagated(self, graph, name: str = "policy"):
        """Its argument shardings with op options chosen by `search.propagate`, which trades the
        resharding bytes around each op against a bonus for the options the policy prefers (its
        probability times the bytes the op reads and writes): the policy's choices made
        consistent with each other."""
        from tag_jax.strategy import Strategy

        ctx = self.context
        prob: dict[int, np.ndarray] = {}
        for members, p in zip(ctx.classes, self.op_prior):
            for i in members:
                prob[i] = p
        index = {}
        around = {}

        def prefer(op, s):
            p = prob.get(op.id)
            if p is None:
                return 0.0
            if op.id not in index:
                index[op.id] = {id(o): k for k, o in enumerate(ctx.op_strategies[op.id])}
                around[op.id] = float(sum(graph.tensors[t].nbytes for t in op.inputs + op.outputs))
            k = index[op.id][id(s)]
            return float(p[k]) * around[op.id] if k < len(p) else 0.0

        choices = features.propagated(graph, ctx.op_strategies, self.mesh, ctx.groups,
                                      ctx.batch_sets, self.decision, prefer=prefer)
        storage, _ = features.input_shardings(graph, ctx.groups, ctx.batch_sets, self.decision)
        return Strategy(self.mesh, choices, storage, name=name)


class Policy:
    """A trained PolicyNet with its weights; immutable after construction."""

    def __init__(self, params, config: dict, meta: dict | None = None, path: str | None = None):
        import jax

        from tag_jax.policy.network import PolicyNet

        self.params, self.config, self.meta, self.path = params, dict(config), dict(meta or {}), path
        net = PolicyNet(**self.config)
        self._apply = jax.jit(lambda p, g: net.apply({"params": p}, g))

    @classmethod
    def load(cls, path: str = store.DEFAULT_PATH) -> "Policy":
        params, config, meta = store.load(path)
        return cls(params, config, meta, path)

    def __repr__(self) -> str:
        return f"Policy({self.path or 'in memory'}, {self.config})"

    def apply(self, graphs) -> dict:
        """Raw network outputs (numpy) for a padded batch of GraphsTuples."""
        return {k: np.asarray(v) for k, v in self._apply(self.params, graphs).items()}

    def guide(self, graph, topology, meshes: Sequence, contexts: Sequence | None = None) -> list[Guide]:
        return self.assess(graph, topology, meshes, contexts)[0]

    def assess(self, graph, topology, meshes: Sequence, contexts: Sequence | None = None
               ) -> tuple[list[Guide], list[tuple[int, str, float]]]:
        """(one Guide per mesh, the seeds ranked): the hand-written seeds of every mesh
        (`features.seed_candidates`) as (mesh index, kind, score), the one to price first first.
        One network call; the first mesh's graph carries the seeds."""
        ctxs = list(contexts) if contexts is not None else [features.context(graph, m) for m in meshes]
        cands = features.seed_candidates(meshes)
        rows = features.candidate_rows(graph, topology, meshes, cands)
        gs = [features.build(graph, topology, m, c, candidates=rows if k == 0 else None)
              for k, (m, c) in enumerate(zip(meshes, ctxs))]
        out = self.apply(features.pad(gs))
        scores = out["rank"][0][:len(cands)]
        ranking = sorted(((k, kind, float(sc)) for (k, kind), sc in zip(cands, scores)),
                         key=lambda r: -r[2])
        res, base = [], 0
        for k, (m, c, g) in enumerate(zip(meshes, ctxs, gs)):
            units = [len(u.options) for u in c.groups] + [len(c.batch_sets)]
            units += [len(c.op_strategies[members[0]]) for members in c.classes]
            prior, decision = [], []
            for j, n in enumerate(units):
                s = out["options"][base + j][:min(n, features.MAX_OPTIONS)].astype(np.float64)
                p = np.exp(s - s.max())
                p = np.concatenate([p / p.sum(), np.zeros(max(0, n - features.MAX_OPTIONS))])
                prior.append(p)
                decision.append(int(np.argmax(p)))
            G1 = len(c.groups) + 1
            res.append(Guide(m, tuple(decision[:G1]), tuple(prior[:G1]), float(out["mesh"][k]),
                             float(out["value"][k]), tuple(decision[G1:]), tuple(prior[G1:]), c))
            base += int(g.n_node[0])
        return res, ranking


@functools.lru_cache(maxsize=1)
def _shipped(path: str, mtime: float) -> Policy:
    return Policy.load(path)


def default_policy() -> Policy | None:
    """The shipped policy, or None when the package has no weights file."""
    path = store.DEFAULT_PATH
    if not os.path.exists(path):
        return None
    return _shipped(path, os.path.getmtime(path))


def resolve(policy) -> Policy | None:
    """`"default"` -> the shipped policy (or None); None -> None; a Policy or a path -> a Policy."""
    if isinstance(policy, str):
        return default_policy() if policy == "default" else Policy.load(policy)
    return policy


MESHES_TRIED = 3  # the policy's plans are priced on the meshes it ranks this high
BASELINES_TRIED = ("data_parallel", "fsdp", "megatron")  # priced beside its readings (megatron: 2-D)


class _Counted:
    """A simulator that counts its pricings; a strategy priced again is not priced twice."""

    def __init__(self, sim):
        self.sim, self.evaluations, self._seen = sim, 0, {}

    def cost(self, strategy):
        hit = self._seen.get(id(strategy))
        if hit is not None and hit[0] is strategy:
            return hit[1]
        cost = self.sim.cost(strategy)
        self.evaluations += 1
        self._seen[id(strategy)] = (strategy, cost)
        return cost


def policy_plan(policy: Policy, graph, topology, meshes: Sequence, memory_limit: float | None):
    """SearchResult of the policy's plan alone, or None if none of its plans fits. Meshes are
    ranked by the best score the ranking head gives a seed on each (`Policy.assess`). On each
    of the MESHES_TRIED meshes it ranks first (more where none fits), three readings of its scores are
    priced: its op options with its argument shardings (`Guide.strategy`), the same made
    consistent by propagation (`Guide.propagated`), and its argument shardings with op options
    propagated as the annealer does. Beside them the hand-written baselines are priced
    (`baseline_strategy`): Megatron on those of these meshes that are 2-D, data parallel and FSDP
    once per set of devices on every candidate mesh (a mesh of only the faster devices of a
    mixed cluster may be ranked low), and so is the replicated plan, so the plan returned, the
    fastest that fits, is never slower than data parallel, FSDP or replication on any set of
    devices the planner considers. Simulator
    evaluations, all counted in `evaluations`: 3 readings per mesh tried, 1-2 per baseline
    (`baseline_strategy` prices both of its readings where they differ; the one it returns is
    not priced again); benchmarks/POLICY.md gives the counts on its held-out cases. No
    search moves."""
    import time

    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.anneal import SearchResult
    from tag_jax.search.planner import replicated_strategy
    from tag_jax.search.propagate import carried_outputs
    from tag_jax.strategy import Strategy

    t0 = time.perf_counter()
    # meshes in the order of the best seed the ranking head puts on each (its mesh logit is the
    # weaker reading of the two)
    guides, ranking = policy.assess(graph, topology, meshes)
    first = {}
    for k, _, score in ranking:
        first.setdefault(k, score)
    guides = [guides[k] for k in sorted(range(len(guides)),
                                        key=lambda k: (-first.get(k, -math.inf), -guides[k].mesh_logit))]
    carried = carried_outputs(graph)
    sims, best, seeds, devices_seen = [], None, {}, set()

    def consider(cost, k, strategy, g, name):
        fits = memory_limit is None or cost.peak_memory_bytes <= memory_limit
        seeds[name] = min(seeds.get(name, math.inf), cost.step_time_s)
        nonlocal best
        if fits and (best is None or cost.step_time_s < best[0]):
            best = (cost.step_time_s, k, strategy, cost, g, name)

    for k, g in enumerate(guides):
        devices = frozenset(g.mesh.device_ids)
        readings = k < MESHES_TRIED or best is None
        if not readings and ("data_parallel", devices) in devices_seen:
            continue  # past the top meshes only a set of devices not yet priced is visited
        ctx = g.context
        sim = _Counted(Simulator(graph, ctx.op_strategies, topology, g.mesh, carried=carried))
        sims.append(sim)
        if readings:
            storage, _ = features.input_shardings(graph, ctx.groups, ctx.batch_sets, g.decision)
            plain = features.propagated(graph, ctx.op_strategies, g.mesh, ctx.groups, ctx.batch_sets,
                                        g.decision)
            for strategy in (g.strategy(graph), g.propagated(graph),
                             Strategy(g.mesh, plain, storage, name="policy")):
                consider(sim.cost(strategy), k, strategy, g, f"policy (mesh choice {k + 1})")
        for kind in BASELINES_TRIED:
            if kind == "megatron" and (len(g.mesh.shape) != 2 or not readings):
                continue
            # data parallel and FSDP use every axis alike: one mesh per set of devices says all
            if kind != "megatron" and (kind, devices) in devices_seen:
                continue
            devices_seen.add((kind, devices))
            strategy = baseline_strategy(kind, graph, ctx.op_strategies, g.mesh, simulator=sim,
                                         memory_limit=memory_limit)
            consider(sim.cost(strategy), k, strategy, g, f"{kind} (mesh choice {k + 1})")
        if ("replicated", devices) not in devices_seen:
            # no communication at all: the fastest for small models on slow links
            devices_seen.add(("replicated", devices))
            strategy = replicated_strategy(graph, g.mesh)
            consider(sim.cost(strategy), k, strategy, g, f"replicated (mesh choice {k + 1})")
    if best is None:
        return None
    score, k, strategy, cost, g, name = best
    decisions = {u.key: u.options[i] for u, i in zip(g.context.groups, g.decision)}
    strategy = dataclasses.replace(strategy, name=f"tag_jax ({name})")
    return SearchResult(strategy=strategy, cost=cost, evaluations=sum(s.evaluations for s in sims),
                        seconds=time.perf_counter() - t0, seeds=seeds,
                        decisions=decisions, history=((time.perf_counter() - t0, score),))
