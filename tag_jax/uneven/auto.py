"""`auto_shard(step, ..., uneven=...)`: one SPMD program or an uneven plan behind one function.

    step = tag_jax.uneven.split_step(loss_fn, optax.adamw(1e-3))     # an UnevenStep: also a step
    fn = tag_jax.auto_shard(step, jax.devices(), topology=topology)   # uneven="auto"
    plan = fn.plan(state, batch)     # a Plan (one SPMD program) or an UnevenPlan, the faster one
    state, metrics = fn(state, batch)

`uneven="auto"` plans uneven work only on heterogeneous devices (more than one device kind among
the mesh's devices) and keeps it only when the simulator prices it faster than the best single
SPMD plan; `True` always runs the uneven plan; `False` always one SPMD program.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from tag_jax.uneven.plan import UnevenPlan
from tag_jax.uneven.price import UnevenError
from tag_jax.uneven.steps import UnevenStep

MODES = ("auto", True, False)


def check_uneven(fn: Callable, uneven: Any) -> bool:
    """Whether `auto_shard` should consider uneven plans for `fn`; raises on a bad request."""
    if not (uneven is True or uneven is False or (isinstance(uneven, str) and uneven == "auto")):
        raise ValueError(f"auto_shard(uneven={uneven!r}): pass 'auto' (uneven plans where the simulator "
                         "prices them faster, on heterogeneous devices), True (always) or False (never)")
    if uneven is False:
        return False
    if isinstance(fn, UnevenStep):
        return True
    if uneven is True:
        raise UnevenError(
            f"auto_shard(uneven=True) needs the step in two halves, but got "
            f"{getattr(fn, '__name__', type(fn).__name__)!r}, a plain function: uneven plans give each "
            "device group its own share of the batch and combine the gradients before one optimizer "
            "update. Make the step with tag_jax.uneven.split_step(loss_fn, optimizer) (state = "
            "tag_jax.uneven.init_state(params, optimizer); loss_fn(params, batch) returns the MEAN loss "
            "over the batch) or tag_jax.uneven.UnevenStep(grad_fn, apply_fn); it is still callable as "
            "the whole step. Or pass uneven=False.")
    return False  # "auto" with a plain function: one SPMD program, as before


class UnevenFunction:
    """What `auto_shard` returns for an `UnevenStep`: `.plan(state, batch)` is the chosen plan (a
    `Plan` or an `UnevenPlan`), calling it runs the chosen program. `.spmd` is the single-SPMD
    `ShardedFunction` of the same step (the plan uneven plans are compared with)."""

    def __init__(self, step: UnevenStep, spmd, topology, device_ids: Sequence[int], *, mode="auto",
                 memory_limit: float | None = None,
                 compiler_options: Mapping[str, Any] | None = None):
        self.step, self.spmd, self.topology = step, spmd, topology
        self.device_ids = tuple(device_ids)
        self.mode, self.memory_limit, self.compiler_options = mode, memory_limit, compiler_options
        self.__name__ = step.name
        self.__wrapped__ = step
        self._plans: dict[tuple, Any] = {}
        self._programs: dict[tuple, Any] = {}
        self._why: dict[tuple, str] = {}

    @property
    def heterogeneous(self) -> bool:
        return len({self.topology.device(i).kind for i in self.device_ids}) > 1

    def plan(self, state: Any, batch: Any):
        """The plan that runs: an `UnevenPlan` or the single-SPMD `Plan` (abstract inputs are fine)."""
        from tag_jax.plan import signature

        key = signature((state, batch))
        if key not in self._plans:
            self._plans[key] = self._choose(key, state, batch)
        return self._plans[key]

    def why(self, state: Any, batch: Any) -> str:
        """One line: why this plan was chosen."""
        from tag_jax.plan import signature

        self.plan(state, batch)
        return self._why[signature((state, batch))]

    def _choose(self, key, state, batch):
        from tag_jax.uneven.search import plan_uneven

        if self.mode == "auto" and not self.heterogeneous:
            self._why[key] = "one SPMD program: all devices are of one kind"
            return self.spmd.plan(state, batch)
        spmd = self.spmd.plan(state, batch) if self.mode == "auto" else None
        try:
            plan = plan_uneven(self.step, state, batch, self.topology, self.device_ids,
                               memory_limit=self.memory_limit)
        except (UnevenError, ValueError) as e:
            if self.mode is True:
                raise UnevenError(f"auto_shard(uneven=True): no uneven plan of {self.step.name}: {e}") from e
            self._why[key] = f"one SPMD program: no uneven plan ({e})"
            return spmd
        if spmd is not None:
            t = spmd.cost.step_time_s
            plan = plan.compared_with(t)
            if plan.step_time_s >= t:
                self._why[key] = (f"one SPMD program: predicted {t:.4g} s, the best uneven plan "
                                  f"{plan.step_time_s:.4g} s")
                return spmd
        self._why[key] = ("uneven plan: " + (f"predicted {plan.step_time_s:.4g} s, one SPMD program "
                                            f"{spmd.cost.step_time_s:.4g} s" if spmd is not None
                                            else "asked for (uneven=True)"))
        return plan

    def program(self, state: Any, batch: Any) -> Callable:
        """The callable that runs the chosen plan."""
        from tag_jax.plan import signature
        from tag_jax.uneven.program import UnevenProgram

        plan = self.plan(state, batch)
        if not isinstance(plan, UnevenPlan):
            return self.spmd
        key = signature((state, batch))
        if key not in self._programs:
            self._programs[key] = UnevenProgram(self.step, plan, compiler_options=self.compiler_options)
        return self._programs[key]

    def compiled(self, state: Any, batch: Any) -> dict[str, Any]:
        """The compiled programs of the chosen plan, by name ("spmd", or "group <name>", "combine",
        "apply", or "one program" for a mode-"one" plan), compiled on abstract inputs: for
        `tag_jax.hlo.collectives`."""
        program = self.program(state, batch)
        if program is self.spmd:
            return {"spmd": self.spmd.lower(state, batch).compile()}
        return program.compiled(state, batch)

    def lower(self, state: Any, batch: Any):
        if self.program(state, batch) is not self.spmd:
            raise UnevenError(f"{self.step.name} runs an uneven plan: several programs, not one to "
                              "lower; use .compiled(state, batch) for all of them")
        return self.spmd.lower(state, batch)

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        return self.program(state, batch)(state, batch)

    def __repr__(self) -> str:
        return f"UnevenFunction({self.__name__}, uneven={self.mode!r}, {len(self._plans)} plan(s))"
