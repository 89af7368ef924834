"""One SPMD program or an uneven plan: whichever the simulator prices faster."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from tag_jax.uneven.plan import UnevenPlan
from tag_jax.uneven.steps import UnevenStep


@dataclasses.dataclass(frozen=True)
class Choice:
    """`spmd`: the planner's best single-SPMD `SearchResult`; `uneven`: the best `UnevenPlan`
    (None when not asked for or impossible, with `why`); `kind`: the faster of the two."""

    spmd: Any
    uneven: UnevenPlan | None
    why: str = ""

    @property
    def kind(self) -> str:
        if self.uneven is not None and self.uneven.step_time_s < self.spmd.cost.step_time_s:
            return "uneven"
        return "spmd"

    @property
    def step_time_s(self) -> float:
        return self.uneven.step_time_s if self.kind == "uneven" else self.spmd.cost.step_time_s

    @property
    def speedup(self) -> float:
        """Best single-SPMD step time over the chosen plan's (1.0 when SPMD is chosen)."""
        return self.spmd.cost.step_time_s / self.step_time_s


def choose(step_fn: Callable, uneven_step: UnevenStep | None, state: Any, batch: Any, topology,
           device_ids: Sequence[int] | None = None, *, uneven: bool = True, time_budget_s: float = 7.0,
           memory_limit: float | None = None, seed: int = 0, graph=None) -> Choice:
    """Search the single-SPMD plan of `step_fn(state, batch)` and, with `uneven`, the best uneven
    plan of `uneven_step`; the faster one is `Choice.kind`."""
    from tag_jax.cost.simulate import USABLE_MEMORY
    from tag_jax.hlo.trace import trace
    from tag_jax.plan import abstract
    from tag_jax.search.planner import search
    from tag_jax.uneven.price import UnevenError
    from tag_jax.uneven.search import plan_uneven

    ids = list(topology.ids if device_ids is None else device_ids)
    graph = graph if graph is not None else trace(step_fn, *abstract((state, batch)))
    limits = {"memory_limit": memory_limit} if memory_limit is not None else \
        {"memory_fraction": USABLE_MEMORY}  # (each mesh its own devices' memory)
    spmd = search(graph, topology, ids, time_budget_s=time_budget_s, seed=seed, **limits)
    if not uneven or uneven_step is None:
        return Choice(spmd, None, "uneven plans not asked for")
    try:
        plan = plan_uneven(uneven_step, state, batch, topology, ids, memory_limit=memory_limit)
    except (UnevenError, ValueError) as e:
        return Choice(spmd, None, str(e))
    return Choice(spmd, plan)
