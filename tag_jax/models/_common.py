"""Shared machinery: a Flax module plus a loss becomes a pure optax training step, abstractly init.

Every family file describes only what differs (module, batch, loss) as a `Task`; `ModelSpec.get`
turns that into an `Example`. Keeping the step a function of plain dicts means its pytree paths read
like `params/h_3/attn/c_attn/kernel`, which is what the planner prints.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

PyTree = Any

# The example batch comes from this fixed seed: the data does not change with the parameter key.
BATCH_SEED = 0

_STATE_KEYS = ("params", "opt_state", "step")
_DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model family provides; everything else about a training step is shared.

    model: the Flax module.
    sample_batch: key -> batch dict of concrete arrays (also traced abstractly by `jax.eval_shape`).
    inputs: batch -> positional arguments for `model.init`.
    loss: (variables, batch) -> (scalar float32 loss, metrics dict, updated mutable collections).
      Collections other than "params" (e.g. BatchNorm's "batch_stats") sit beside params in state.
    """

    model: nn.Module
    sample_batch: Callable[[jax.Array], dict]
    inputs: Callable[[dict], tuple]
    loss: Callable[[dict, dict], tuple]


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One benchmark: a pure training step with abstract state and batch (never allocated)."""

    name: str
    size: str
    step: Callable[[dict, dict], tuple]
    state: PyTree
    batch: PyTree
    init: Callable[[jax.Array], tuple]
    param_count: int
    description: str
    config: Any = None

    def __repr__(self) -> str:
        return f"Example({self.name!r}, {self.size!r}, params={self.param_count:,})"


def make_optimizer(optimizer: str | optax.GradientTransformation, learning_rate: float | None):
    """adamw (default) or sgd by name; an optax transformation is used as given."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer not in _DEFAULT_LR:
        raise ValueError(
            f"unknown optimizer {optimizer!r}: pass one of {sorted(_DEFAULT_LR)} "
            "or an optax.GradientTransformation")
    lr = _DEFAULT_LR[optimizer] if learning_rate is None else learning_rate
    if optimizer == "sgd":
        return optax.sgd(lr)
    return optax.adamw(lr, weight_decay=0.01)


# Makes fast_compile_options() codegen consistent (see there); an XLA_FLAGS entry, not an option.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_extra_options=-fast-isel=false"


def fast_compile_options() -> dict:
    """XLA options that make tiny programs compile several times faster and compute the same values.

    Backend optimisation off (on XLA:CPU it otherwise takes seconds per threefry shape); on CPU also
    the classic loop emitters instead of the fusion emitters, about 4x faster to compile a toy step.
    For `jax.jit(..., compiler_options=...)` in tests; not meant for timing runs.

    At this level XLA:CPU compiles some kernels with LLVM's FastISel (no FMA contraction) and others
    with SelectionDAG (FMA), so a value that fusion duplicates into two kernels can differ in its last
    bit, and jax's derivative of `max` (`x == max(0, x)`) flips to 0 (benchmarks/xla_repro_cpu_o0_fma.py).
    Processes that use these options must also set `FAST_COMPILE_XLA_FLAGS` in XLA_FLAGS before jax
    starts (tests/conftest.py and the benchmarks do): it cannot go into `compiler_options`.
    """
    from tag_jax.rules.validate import fast_compile_options as options  # (the rule validator's too)

    return options()


def count_params(params: PyTree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _batch_key(key):
    """The fixed batch key, with the same PRNG implementation as the caller's key."""
    impl = jax.random.key_impl(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else None
    return jax.random.key(BATCH_SEED, impl=impl)


def _floating_as(tree, dtype):
    """Floating leaves of `tree` cast to `dtype` (integer ids, labels and masks are left alone)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def compute_dtype_of(compute_dtype):
    """None (float32 throughout) or a 16-bit floating dtype for mixed-precision training."""
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        dtype = None
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"compute_dtype={compute_dtype!r}: pass None, 'bfloat16', 'float16' or "
                         "'float32'")
    return None if dtype == jnp.dtype(jnp.float32) else dtype


def make_example(name, size, cfg, task: Task, *, optimizer="adamw", learning_rate=None,
                 description="", compute_dtype=None) -> Example:
    """`compute_dtype` (e.g. "bfloat16"): mixed precision as Flax/optax loops do it. Parameters,
    optimizer state and collections stay float32 in the state (the master copy); the forward and
    backward pass run on copies cast to the 16-bit dtype, floating batch inputs too, so matmuls run
    at the device's 16-bit rate; the loss is float32 and the gradients come back float32 through
    the casts, so the update is float32."""
    tx = make_optimizer(optimizer, learning_rate)
    low = compute_dtype_of(compute_dtype)

    def init(key):
        batch = task.sample_batch(_batch_key(key))
        variables = dict(task.model.init(key, *task.inputs(batch)))
        params = variables.pop("params")
        state = {"params": params, "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), **variables}
        return state, batch

    def step(state, batch):
        extra = {k: v for k, v in state.items() if k not in _STATE_KEYS}

        def objective(params):
            if low is None:
                return _objective(params, extra, batch)
            loss, (metrics, updated) = _objective(
                _floating_as(params, low), _floating_as(extra, low), _floating_as(batch, low))
            # collections (BatchNorm statistics) go back to their float32 state dtype
            old = jax.tree_util.tree_leaves({k: extra[k] for k in updated})
            new, treedef = jax.tree_util.tree_flatten(updated)
            updated = treedef.unflatten([n.astype(o.dtype) for n, o in zip(new, old)])
            return loss.astype(jnp.float32), (_floating_as(metrics, jnp.float32), updated)

        def _objective(params, extra, batch):
            loss, metrics, updated = task.loss({"params": params, **extra}, batch)
            return loss, (metrics, updated)

        (loss, (metrics, updated)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {**extra, **updated,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, **metrics}

    # A readable name shows up in jaxprs, HLO module names and profiles.
    step.__name__ = step.__qualname__ = f"{name}_{size}_train_step".replace("-", "_")
    init.__name__ = init.__qualname__ = f"{name}_{size}_init".replace("-", "_")

    state, batch = jax.eval_shape(init, jax.random.key(0))  # shapes only: nothing is allocated
    # init is jitted (eagerly, Flax dispatches and compiles hundreds of tiny ops) and compiled for
    # speed of compilation: it runs once, on toy sizes.
    fast_init = jax.jit(init, compiler_options=fast_compile_options())
    return Example(name=name, size=size, step=step, state=state, batch=batch, init=fast_init,
                   param_count=count_params(state["params"]), description=description,
                   config=cfg)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model family: named sizes (config dataclasses) and how to build a `Task` from one."""

    name: str
    description: str
    configs: Mapping[str, Any]
    task: Callable[[Any], Task]

    def sizes(self) -> tuple[str, ...]:
        return tuple(self.configs)

    def get(self, size="toy", *, optimizer="adamw", learning_rate=None, compute_dtype=None,
            **overrides) -> Example:
        """Build the example; `overrides` replace config fields (e.g. batch=8, scan_layers=True);
        `compute_dtype="bfloat16"` trains in mixed precision (see `make_example`)."""
        if size not in self.configs:
            raise KeyError(f"model {self.name!r} has no size {size!r}; sizes: {list(self.configs)}")
        cfg = self.configs[size]
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {unknown}; "
                            f"options are the config fields {sorted(fields)}")
        cfg = dataclasses.replace(cfg, **overrides)
        shown = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
        return make_example(self.name, size, cfg, self.task(cfg), optimizer=optimizer,
                            learning_rate=learning_rate, compute_dtype=compute_dtype,
                            description=f"{self.description} [{size}: {shown}"
                                        + (f", compute_dtype={jnp.dtype(compute_dtype).name}"
                                           if compute_dtype_of(compute_dtype) else "") + "]")


# ---- small helpers shared by the families -------------------------------------------------------

def cross_entropy(logits, labels, weights=None):
    """Mean softmax cross-entropy in float32 (optionally weighted, e.g. masked-LM positions)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if weights is None:
        return losses.mean()
    weights = weights.astype(jnp.float32)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def causal_lm_task(model: nn.Module, batch: int, seq: int, vocab: int) -> Task:
    """Next-token prediction: the loader supplies targets already shifted by one, so both arrays
    are [batch, seq]; the loss is the mean cross-entropy of `model(input_ids)`'s logits."""
    def sample_batch(key):
        tokens = jax.random.randint(key, (batch, seq + 1), 0, vocab, jnp.int32)
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(variables, b):
        logits = model.apply(variables, b["input_ids"])
        return cross_entropy(logits, b["targets"]), {}, {}

    return Task(model, sample_batch, lambda b: (b["input_ids"],), loss)


def accuracy(logits, labels):
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
