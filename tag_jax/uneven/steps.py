"""What the uneven path needs from a training step: a gradient function and an apply function.

An SPMD step `step(state, batch)` is one traced program; splitting the batch unevenly needs its two
halves apart, because each group computes gradients on its own share and only the combined
gradient may update the state:

    grad_fn(inputs, batch) -> (grads, metrics)   gradient of the MEAN loss over `batch`, and metrics
                                                 that are means over `batch` too (loss, accuracy)
    apply_fn(state, grads) -> new_state          the optimizer update with the combined gradient
    inputs(state) -> inputs                      what grad_fn reads from the state (default: params)

Means matter: the gradient of the mean loss over the global batch of N examples is
sum_g (n_g / N) * grad_g, where grad_g is the mean-loss gradient on group g's n_g examples, and the
same weights combine the metrics. A loss that is not a mean over examples (a sum, or one that mixes
examples, like BatchNorm's batch statistics) is not split exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax


def _params(state: Any) -> Any:
    return state["params"]


@dataclasses.dataclass(frozen=True)
class UnevenStep:
    """A training step in two halves; see the module docstring for the contract."""

    grad_fn: Callable[[Any, Any], tuple[Any, Any]]
    apply_fn: Callable[[Any, Any], Any]
    inputs: Callable[[Any], Any] = _params
    name: str = "step"

    def reference(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """The unsplit step on the whole batch (what a split step must equal)."""
        grads, metrics = self.grad_fn(self.inputs(state), batch)
        return self.apply_fn(state, grads), metrics


def split_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, has_aux: bool = False,
               name: str | None = None) -> UnevenStep:
    """An `UnevenStep` for `state = {"params", "opt_state", "step"}` (as optax steps keep it).

    `loss_fn(params, batch)` returns the mean loss over the batch (with `has_aux`, a pair
    (loss, metrics dict) whose metrics are means over the batch too). `optimizer.init(params)`
    makes `opt_state`; `state["step"]` counts steps.
    """
    def grad_fn(params, batch):
        if has_aux:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            return grads, {"loss": loss, **aux}
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return grads, {"loss": loss}

    def apply_fn(state, grads):
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state, "step": state["step"] + 1}

    return UnevenStep(grad_fn, apply_fn, name=name or getattr(loss_fn, "__name__", "step"))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> dict:
    """The state `split_step` expects, for these parameters."""
    import jax.numpy as jnp

    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
