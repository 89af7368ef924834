"""Group programs that are SPMD programs of their own (the plan's `group_program = "spmd"`).

Instead of per-device gradients combined later, group g runs `grad_fn` on its whole share as one
SPMD program on its mesh ("data", "local") = (|g| / L, L): the parameter shards of the layout
(`tag_jax.uneven.layout`) are all-gathered over "local" first (as in mode "rows"), then the planned
program runs with the parameters whole and the batch split over both axes; its op choices are
`tag_jax.search.propagate`'s for those inputs, asked to return the gradients whole (an all-reduce
over the group: the group's gradient reduction happens inside the group, on its own links, and the
simulator overlaps it with the backward pass as it does for any plan); each device then keeps its
chunk of the layout, a local slice. The program is emitted like any plan
(`Plan.build(...).jit()`), so its compiled collectives are checked against the simulator's.
(Feeding the planned program the sharded parameters instead, FSDP-style, lets XLA reduce-scatter
the gradients along the parameters' sharding and gather them twice, which the simulator does not
predict: jax 0.10.2, an 8-CPU-device test; so the gather stays explicit.)

Each device then holds its chunk of the group's MEAN gradient (the same on the group's |g| / L
sub-groups), and the combining program only all-reduces the chunks across sub-groups with weights
(n_g / N) / (|g| / L): the gradient of the mean loss over the global batch, exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tag_jax.uneven import layout
from tag_jax.uneven.groups import Group


@dataclasses.dataclass(frozen=True)
class GroupStrategy:
    graph: Any          # the gradient graph at the group's share
    mesh: Any           # MeshSpec ("data", "local") over the group's devices
    ops: Any            # rules.for_graph
    strategy: Any
    cost: Any


def group_strategy(graph, topology, group: Group, local: int) -> GroupStrategy:
    """The group's SPMD strategy for `graph` (gradients at the group's share) and its cost."""
    from tag_jax import rules
    from tag_jax.cost import Simulator
    from tag_jax.baselines import baseline_strategy, input_shardings
    from tag_jax.strategy import MeshSpec, TensorSharding

    # axes of size 1 left out (the simulator would price moving data between ("data", "local") and
    # ("local",) layouts that are the same on the devices); the program's jax mesh keeps both
    axes = [(n, a) for n, a in ((group.size // local, "data"), (local, "local")) if n > 1] or [(1, "local")]
    mesh = MeshSpec(tuple(n for n, _ in axes), tuple(a for _, a in axes), tuple(group.device_ids))
    ops = rules.for_graph(graph, mesh.axes)

    # the data-parallel baseline's strategy (`tag_jax.baselines`): batch split over both axes,
    # parameters whole, op options by `propagate`, gradients all-reduced over the group. The group
    # program returns every result whole (`UnevenProgram._spmd_group_program`), but the baseline
    # may leave a gradient sharded (it reduce-scatters gpt2's tied embedding at real size: the
    # scatter-add half of that gradient comes sharded on the hidden dimension, so asking
    # `propagate` for the result whole changes nothing), and XLA then all-gathers it back. So the
    # simulator carries each result back to a replicated input of its shape (the parameters, whole
    # in data parallel): a result left sharded is priced as that all-gather.
    ins = input_shardings("data_parallel", graph, mesh)
    whole = [i for i, s in zip(graph.inputs, ins) if s == TensorSharding.replicated(len(s.dims))]
    carried = {}
    for o in graph.outputs:
        i = next((i for i in whole if graph.tensors[i].shape == graph.tensors[o].shape), None)
        if i is not None and graph.tensors[o].producer is not None:
            carried[o] = i
    sim = Simulator(graph, ops, topology, mesh, carried=carried)
    strategy = baseline_strategy("data_parallel", graph, ops, mesh, simulator=sim)
    strategy = dataclasses.replace(strategy, name=f"group {group.name} (data parallel)")
    cost = sim.cost(strategy)
    return GroupStrategy(graph, mesh, ops, strategy, cost)
