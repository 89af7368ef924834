"""The imitation data set: random (model, topology) problems labelled by the search, cached on disk.

A record is plain JSON (model family and config, topology dict, per-mesh teacher labels), one file
per problem, so regenerating is resumable and features can change without re-searching. Features
are rebuilt from records by re-tracing the model (abstract, well under a second each).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Iterator

import numpy as np

TEACHER_VERSION = "teacher-3"  # bump when labels change meaning; keys the cache directory
SEEDS_VERSION = "seeds-2"  # the same for the ranking head's priced seeds (`generate_seeds`)
SEED_OFFSET = 50000  # seed problems draw from seed*100000 + SEED_OFFSET + i: none is a teacher's
MESH_TIE = 0.01  # meshes within 1% of the best all count as the best (the mesh head's target)


def default_cache(version: str = TEACHER_VERSION) -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "tag_jax", "policy-data", version)


def _tuples(x):
    """JSON lists back to the tuples model configs use (rows, stages)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def build_problem(family: str, config: dict, topology_dict: dict):
    """(OpGraph, Topology) of one record; abstract tracing only."""
    from tag_jax import models, trace
    from tag_jax.topology import Topology

    ex = models.get(family, "toy", **{k: _tuples(v) for k, v in config.items()})
    return trace(ex.step, ex.state, ex.batch), Topology.from_json(topology_dict)


def progress(i: int, n: int, t0: float, what: str) -> None:
    """A one-line stderr progress bar (no dependency)."""
    done = i / max(n, 1)
    rate = (time.perf_counter() - t0) / max(i, 1)
    bar = "#" * int(30 * done)
    end = "\n" if i == n else ""
    print(f"\r{what} [{bar:<30}] {i}/{n} {rate:.1f} s/it, eta {rate * (n - i) / 60:.1f} min ",
          end=end, file=sys.stderr, flush=True)


def generate(n: int, seed: int = 0, cache: str | None = None, budget_s: float = 1.0,
             show: bool = True) -> list[dict]:
    """n records from problem seeds seed*100000 + i, reusing cached ones; `budget_s` is the
    teacher's search time on each candidate mesh."""
    from tag_jax.policy import teacher, zoo

    def make(key: int) -> dict:
        rng = np.random.default_rng(key)
        family, config = zoo.random_model(rng)
        topo = zoo.random_topology(rng, name=f"random-{key}")
        graph, topology = build_problem(family, config, topo)
        return {"family": family, "config": config, "topology": topo,
                "meshes": teacher.search_labels(graph, topology, budget_s, seed=key - seed * 100000)}

    return _cached([seed * 100000 + i for i in range(n)], cache or default_cache(), make,
                   "searching", show)


def _cached(keys: list[int], cache: str, make, what: str, show: bool) -> list[dict]:
    """One JSON record per key, read from `cache` or made by `make(key)` and written there
    atomically (an interrupted run resumes); a progress bar on stderr."""
    os.makedirs(cache, exist_ok=True)
    out, t0, fresh = [], time.perf_counter(), 0
    for i, key in enumerate(keys):
        path = os.path.join(cache, f"{key:07d}.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
        else:
            rec = make(key)
            with open(path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(path + ".tmp", path)
            out.append(rec)
            fresh += 1
        if show:
            progress(i + 1, len(keys), t0, f"{what} ({fresh} new)")
    return out


def _mesh_dicts(meshes) -> list[dict]:
    return [{"shape": list(m.shape), "axis_names": list(m.axis_names),
             "device_ids": list(m.device_ids)} for m in meshes]


def _meshes(record: dict) -> list:
    from tag_jax.strategy import MeshSpec

    return [MeshSpec(tuple(m["shape"]), tuple(m["axis_names"]), tuple(m["device_ids"]))
            for m in record["meshes"]]


def _seed_labels(times: list[float]) -> list[float]:
    """1 for the seeds within MESH_TIE of the fastest that fits, else 0 (all 0 if none fits)."""
    least = min(times)
    return [float(np.isfinite(t) and t <= least * (1 + MESH_TIE)) for t in times]


def generate_seeds(n: int, seed: int = 0, cache: str | None = None, show: bool = True) -> list[dict]:
    """n records for the ranking head alone, cheap (no search): a random model of
    `zoo.random_scaled_model` on a random topology, its planner meshes, and every hand-written seed
    (`features.seed_candidates`) priced by `teacher.seed_times` ("seeds": [mesh index, kind,
    seconds or None where it does not fit])."""
    from tag_jax.cost.simulate import USABLE_MEMORY
    from tag_jax.policy import features, teacher, zoo
    from tag_jax.search.anneal import candidate_meshes

    def make(key: int) -> dict:
        rng = np.random.default_rng(key)
        family, config = zoo.random_scaled_model(rng)
        topo = zoo.random_topology(rng, name=f"random-{key}")
        graph, topology = build_problem(family, config, topo)
        meshes = candidate_meshes(topology.ids, topology, leave_out=True)
        cands = features.seed_candidates(meshes)
        times = teacher.seed_times(graph, topology, meshes, cands,
                                   USABLE_MEMORY * min(d.memory for d in topology.devices))
        return {"family": family, "config": config, "topology": topo, "meshes": _mesh_dicts(meshes),
                "seeds": [[k, kind, t if np.isfinite(t) else None] for (k, kind), t in zip(cands, times)]}

    return _cached([seed * 100000 + SEED_OFFSET + i for i in range(n)],
                   cache or default_cache(SEEDS_VERSION), make, "pricing seeds", show)


def seed_graph(record: dict):
    """The one GraphsTuple of a `generate_seeds` record: the first mesh's graph carrying every
    seed and which are the best; no other labels (`valid` 0: the mesh and value heads skip it)."""
    from tag_jax.policy import features

    graph, topology = build_problem(record["family"], record["config"], record["topology"])
    meshes = _meshes(record)
    cands = [(int(k), kind) for k, kind, _ in record["seeds"]]
    times = [math.inf if t is None else float(t) for _, _, t in record["seeds"]]
    if not any(np.isfinite(times)):
        return None
    ctx = features.context(graph, meshes[0])
    g = features.build(graph, topology, meshes[0], ctx,
                       candidates=features.candidate_rows(graph, topology, meshes, cands),
                       candidate_best=_seed_labels(times))
    return g._replace(globals=dict(g.globals, valid=np.zeros(1, np.float32)))


def class_labels(ctx, choices) -> list[int]:
    """Each op class's option in a plan (the most common among its members, lowest on ties)."""
    out = []
    for members in ctx.classes:
        votes = np.bincount([choices[i] for i in members])
        out.append(int(np.argmax(votes)))
    return out


def graphs_of(record: dict, inst: int) -> Iterator:
    """Labelled GraphsTuples, one per mesh of the record; globals mark the best mesh."""
    from tag_jax.cost.simulate import USABLE_MEMORY
    from tag_jax.policy import features, teacher

    graph, topology = build_problem(record["family"], record["config"], record["topology"])
    best = min(m["score"] for m in record["meshes"])
    meshes = _meshes(record)
    # The seeds of every mesh, priced (the ranking head's labels), carried by the first graph.
    cands = features.seed_candidates(meshes)
    times = teacher.seed_times(graph, topology, meshes, cands,
                               USABLE_MEMORY * min(d.memory for d in topology.devices))
    least = min(times)
    seed_best = _seed_labels(times)
    rows = features.candidate_rows(graph, topology, meshes, cands)
    ranked = False
    for m, mesh in zip(record["meshes"], meshes):
        if not np.isfinite(m["score"]):
            continue
        ctx = features.context(graph, mesh)
        if len(ctx.groups) + 1 != len(m["decision"]) or len(m["choices"]) != len(graph.ops):
            continue  # the decision units changed since the record was made
        carry = not ranked and np.isfinite(least)
        ranked = ranked or carry
        g = features.build(graph, topology, mesh, ctx, labels=m["decision"],
                           op_labels=class_labels(ctx, m["choices"]),
                           candidates=rows if carry else None,
                           candidate_best=seed_best if carry else None)
        ok = np.isfinite(m["score"]) and np.isfinite(m["dp"])
        glob = dict(g.globals, inst=np.array([inst + 1], np.int32),
                    best=np.array([float(m["score"] <= best * (1 + MESH_TIE))], np.float32),
                    value=np.array([np.log(m["score"] / m["dp"]) if ok else 0.0], np.float32))
        yield g._replace(globals=glob)
