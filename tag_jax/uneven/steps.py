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

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """The whole step, `(state, batch) -> (new_state, metrics)`: an ordinary training step, so
        `jax.jit`, `tag_jax.trace` and `tag_jax.auto_shard` take an `UnevenStep` like any step."""
        return self.reference(state, batch)

    @property
    def __name__(self) -> str:  # what jit and the tracer name the step by
        return self.name


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


def split_train_state(loss_fn: Callable, *, has_aux: bool = False, name: str | None = None) -> UnevenStep:
    """An `UnevenStep` for a `flax.training.train_state.TrainState` (its `tx`, `apply_fn`).

    `loss_fn(apply_fn, params, batch)` returns the mean loss over the batch (with `has_aux`, a pair
    (loss, metrics dict) of means over the batch), e.g.
    `lambda f, p, b: optax.softmax_cross_entropy_with_integer_labels(f({"params": p}, b["x"]), b["y"]).mean()`.
    The group programs read only `state.params` (and the static `apply_fn`); the update is
    `state.apply_gradients(grads=grads)`.
    """
    def grad_fn(inputs, batch):
        def objective(params):
            return loss_fn(inputs.apply_fn, params, batch)

        if has_aux:
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(inputs.params)
            return grads, {"loss": loss, **aux}
        loss, grads = jax.value_and_grad(objective)(inputs.params)
        return grads, {"loss": loss}

    def apply_fn(state, grads):
        return state.apply_gradients(grads=grads)

    def inputs(state):  # the parameters and the static fields, none of the optimizer state
        return state.replace(step=None, opt_state=None)

    return UnevenStep(grad_fn, apply_fn, inputs=inputs, name=name or getattr(loss_fn, "__name__", "step"))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> dict:
    """The state `split_step` expects, for these parameters."""
    import jax.numpy as jnp

    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
