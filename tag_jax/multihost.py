"""One plan for every process of a `jax.distributed` job.

The search is bounded by wall-clock time, so processes under different load could end on different
plans and then run different programs (gloo aborts on the mismatched collectives). Process 0 plans;
every other process receives its plan and checks it against its own trace of the function.
"""
from __future__ import annotations

import json
from typing import Callable

import jax
import numpy as np

from tag_jax.hlo.graph import OpGraph
from tag_jax.plan import Plan


def agreed_plan(make_plan: Callable[[], Plan], graph: OpGraph, topology) -> Plan:
    """`make_plan()` on process 0, the same plan (rebuilt for `graph`) everywhere else."""
    if jax.process_count() == 1:
        return make_plan()
    from jax.experimental import multihost_utils

    mine = make_plan() if jax.process_index() == 0 else None
    data = json.dumps(mine.to_dict()).encode() if mine is not None else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()
    if mine is not None:
        return mine
    return Plan.from_dict(json.loads(received), graph=graph, topology=topology,
                          source=f"process 0's plan of {graph.name}")
