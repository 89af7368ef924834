"""Flax NNX objects as arguments of a planned step, as `nnx.jit` takes them.

An NNX training step mutates its arguments (`optimizer.update(model, grads)`) and may return only
the loss. A planned program is a pure function, so the objects are split into their graph
definition (static: one plan per definition) and their state (arrays, planned like any state);
the pure step merges them, runs the user's step, and returns the new state beside the step's own
results; the call then writes the new state back into the caller's objects (`nnx.update`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def object_positions(args: Sequence[Any]) -> tuple[int, ...]:
    """Positions of the arguments that are NNX graph objects (modules, optimizers)."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return ()
    base = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None)
    return tuple(k for k, a in enumerate(args) if base is not None and isinstance(a, base))


def split(args: Sequence[Any], positions: Sequence[int]) -> tuple[Any, Any, tuple]:
    """(graph definition, state of the objects at `positions`, the other arguments)."""
    from flax import nnx

    graphdef, state = nnx.split(tuple(args[k] for k in positions))
    return graphdef, state, tuple(a for k, a in enumerate(args) if k not in positions)


def pure_step(fn: Callable, graphdef: Any, positions: Sequence[int], n_args: int) -> Callable:
    """`step(state, *others) -> (new state, fn's results)`: fn on the merged objects."""
    from flax import nnx

    at = set(positions)

    def step(state, *others):
        objects = nnx.merge(graphdef, state)
        objs, rest = iter(objects), iter(others)
        out = fn(*(next(objs) if k in at else next(rest) for k in range(n_args)))
        return nnx.split(objects)[1], out

    from tag_jax.plan import named_like

    # the other arguments keep their names (the plan's argument paths); the objects' are `state`
    return named_like(step, fn, [k for k in range(n_args) if k not in at], first="state")


def write_back(args: Sequence[Any], positions: Sequence[int], new_state: Any) -> None:
    """The step's new state into the caller's objects, as `nnx.jit` leaves them."""
    from flax import nnx

    nnx.update(tuple(args[k] for k in positions), new_state)
