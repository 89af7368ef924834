"""Using a trained policy: scores for the search, and the policy's own plan.

`Policy.guide(graph, topology, meshes)` runs the network once over every candidate mesh (one padded
batch) and returns, per mesh, the decision vector it prefers, per-unit option probabilities (the
annealer's move prior) and a mesh logit. `policy_plan` prices that preferred decision on the mesh
the policy ranks first: one simulator evaluation, no search.
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
        ctxs = list(contexts) if contexts is not None else [features.context(graph, m) for m in meshes]
        gs = [features.build(graph, topology, m, c) for m, c in zip(meshes, ctxs)]
        out = self.apply(features.pad(gs))
        res, base = [], 0
        for k, (m, c, g) in enumerate(zip(meshes, ctxs, gs)):
            units = [len(u.options) for u in c.groups] + [len(c.batch_sets)]
            prior, decision = [], []
            for j, n in enumerate(units):
                s = out["options"][base + j][:min(n, features.MAX_OPTIONS)].astype(np.float64)
                p = np.exp(s - s.max())
                p = np.concatenate([p / p.sum(), np.zeros(max(0, n - features.MAX_OPTIONS))])
                prior.append(p)
                decision.append(int(np.argmax(p)))
            res.append(Guide(m, tuple(decision), tuple(prior), float(out["mesh"][k]),
                             float(out["value"][k])))
            base += int(g.n_node[0])
        return res


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


def policy_plan(policy: Policy, graph, topology, meshes: Sequence, memory_limit: float | None):
    """(SearchResult, annealer) for the policy's plan alone, or None if none of its plans fits."""
    import time

    from tag_jax.policy.teacher import mesh_problem
    from tag_jax.search.anneal import SearchResult

    t0 = time.perf_counter()
    guides = sorted(policy.guide(graph, topology, meshes), key=lambda g: -g.mesh_logit)
    for k, g in enumerate(guides):
        ann, _ = mesh_problem(graph, topology, g.mesh, memory_limit)
        score, cost, strategy = ann.evaluate(g.decision)
        if math.isfinite(score):
            name = f"policy (mesh choice {k + 1})"
            decisions = {u.key: u.options[i] for u, i in zip(ann.groups, g.decision)}
            strategy = dataclasses.replace(strategy, name=f"tag_jax ({name})")
            return SearchResult(strategy=strategy, cost=cost, evaluations=ann.evaluations,
                                seconds=time.perf_counter() - t0, seeds={name: cost.step_time_s},
                                decisions=decisions, history=((time.perf_counter() - t0, score),))
    return None
