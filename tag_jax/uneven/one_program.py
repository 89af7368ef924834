"""Running a mode-"one" plan (`tag_jax.uneven.one`): one jitted program over all the plan's devices.

    jit( state, batch, counts ->
         grads, metrics = shard_map over ("devices",):
             c = counts[0]                        this device's number of microbatches (its row)
             acc = fori_loop(0, c - 1, acc + grad_fn(params, microbatch i))   no collective inside
             g = acc + grad_fn(params, microbatch c - 1)                     the peeled last one
             psum(g * m / N, "devices")           leaf by leaf: XLA may start each all-reduce as
                                                  soon as the last backward pass produces its leaf
         apply_fn(state, grads) )                 the update, replicated (no collective)

The batch reaches the program padded per device to the largest count: device d's block of
C_max * m rows holds its c_d * m examples (in the global batch's order: group after group, device
after device) and zeros after them, which the loop never reads (it runs c_d - 1 iterations, and
the last microbatch is block c_d - 1). The counts are an int32 array with one row per device.
Parameters are marked device-varying inside the shard_map (`lax.pcast`) so that differentiating
them adds no psum of its own: the only collectives are the weighted psums, checked on every new
compilation (`loop_collectives`: none may sit inside a while loop).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tag_jax.uneven.one import check_plan, per_device_counts
from tag_jax.uneven.plan import UnevenPlan
from tag_jax.uneven.price import UnevenError, global_batch
from tag_jax.uneven.program import plan_devices, varying_axes
from tag_jax.uneven.steps import UnevenStep

AXIS = "devices"


class OneProgram:
    """`program(state, batch) -> (new_state, metrics)` for a mode-"one" `UnevenPlan` (what
    `UnevenProgram(step, plan)` returns for such a plan). The state is replicated on the plan's
    devices (`shard_state`)."""

    def __init__(self, step: UnevenStep, plan: UnevenPlan, *, devices=None,
                 compiler_options: Mapping[str, Any] | None = None):
        check_plan(plan)
        devices = plan_devices(plan, devices)
        self.step, self.plan = step, plan
        self.local = 1
        self.mesh = Mesh(np.array([devices[i] for i in plan.device_ids]), (AXIS,),
                         axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(AXIS))
        self.m = plan.microbatch
        self.device_counts = per_device_counts(plan)
        self.most = max(self.device_counts)
        c = np.asarray(self.device_counts, np.int32)
        self.counts = jax.make_array_from_callback(c.shape, self.rows, lambda idx: c[idx], dtype=c.dtype)
        # rows of the global batch -> rows of the padded per-device blocks
        src, dst, off = [], [], 0
        for d, k in enumerate(self.device_counts):
            n = k * self.m
            src.append(np.arange(off, off + n))
            dst.append(np.arange(d * self.most * self.m, d * self.most * self.m + n))
            off += n
        self._src, self._dst = np.concatenate(src), np.concatenate(dst)
        self.padded_rows = len(self.device_counts) * self.most * self.m
        self.opts = dict(compiler_options or {})
        self._jit = jax.jit(self._program, out_shardings=self.replicated,
                            compiler_options=self.opts or None)
        self._compiled: dict = {}

    # ---- the program --------------------------------------------------------------------------
    def _local(self, params, batch, counts):
        grad_fn, m, C, N = self.step.grad_fn, self.m, self.most, self.plan.batch

        def varying(p):  # else the transpose of an invariant use would psum the gradient itself
            vma = varying_axes(p)
            return p if AXIS in vma else jax.lax.pcast(p, (AXIS,), to="varying")

        params = jax.tree_util.tree_map(varying, params)
        blocks = jax.tree_util.tree_map(lambda x: x.reshape((C, m) + x.shape[1:]), batch)

        def gradient(i):
            mb = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False),
                                        blocks)
            return grad_fn(params, mb)

        c = counts[0]
        shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], blocks))
        zero = jax.tree_util.tree_map(lambda s: varying(jnp.zeros(s.shape, s.dtype)), shapes)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
        acc = jax.lax.fori_loop(0, c - 1, lambda i, a: add(a, gradient(i)), zero)
        total = add(acc, gradient(c - 1))
        w = m / N  # each microbatch's mean, weighted by its share of the global batch
        return jax.tree_util.tree_map(lambda x: jax.lax.psum(x * jnp.asarray(w, x.dtype), AXIS), total)

    def _program(self, state, batch, counts):
        inputs = self.step.inputs(state)
        grads, metrics = jax.shard_map(self._local, mesh=self.mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                                       out_specs=P())(inputs, batch, counts)
        return self.step.apply_fn(state, grads), metrics

    # ---- placing data -------------------------------------------------------------------------
    def shard_state(self, state: Any) -> Any:
        """The state replicated on the plan's devices (from host values or arrays)."""
        from tag_jax.uneven.program import _put

        return jax.tree_util.tree_map(lambda x: _put(x, self.replicated), state)

    def device_batch(self, batch: Any) -> Any:
        """The global batch in per-device blocks of the largest count, zero-padded."""
        check_plan(self.plan, global_batch(batch))

        def place(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                raise UnevenError("under jax.distributed pass the global batch as host (numpy) data, "
                                  "the same in every process")
            value = np.asarray(x)
            value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)
            out = np.zeros((self.padded_rows,) + value.shape[1:], value.dtype)
            out[self._dst] = value[self._src]
            return jax.make_array_from_callback(out.shape, self.rows, lambda idx: out[idx], dtype=out.dtype)

        return jax.tree_util.tree_map(place, batch)

    # ---- running and checking -----------------------------------------------------------------
    def _abstract_args(self, state: Any, batch: Any):
        from tag_jax.plan import abstract

        check_plan(self.plan, global_batch(batch))
        s = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.replicated),
                                   abstract(state))
        b = jax.tree_util.tree_map(
            lambda v: jax.ShapeDtypeStruct((self.padded_rows,) + tuple(v.shape[1:]), v.dtype,
                                           sharding=self.rows), abstract(batch))
        c = jax.ShapeDtypeStruct(self.counts.shape, self.counts.dtype, sharding=self.rows)
        return s, b, c

    def compile(self, state: Any, batch: Any):
        """The compiled program for these inputs (memoised), after checking that no collective
        sits inside its loop."""
        from tag_jax.plan import signature

        key = signature((state, batch))
        if key not in self._compiled:
            compiled = self._jit.lower(*self._abstract_args(state, batch)).compile()
            inside = loop_collectives(compiled)
            if inside:
                raise UnevenError(
                    f"the one-program step of {self.step.name} compiled with collectives inside its "
                    f"microbatch loop ({', '.join(f'{c.kind} {c.name}' for c in inside)}): each "
                    "device's loop runs its own number of iterations, so a collective there would "
                    "deadlock or mix iterations; grad_fn must not communicate (no psum, no "
                    "sharding constraints)")
            self._compiled[key] = compiled
        return self._compiled[key]

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        compiled = self.compile(state, batch)
        return compiled(self.shard_state(state), self.device_batch(batch), self.counts)

    def compiled(self, state: Any, batch: Any) -> dict[str, Any]:
        """{"one program": compiled} on abstract inputs, for `tag_jax.hlo.collectives`."""
        return {"one program": self.compile(state, batch)}

    def predicted_collectives(self) -> dict[str, dict[str, int]]:
        """Per-device collective bytes by kind the plan predicts (the simulator's, for the last
        microbatch's data-parallel all-reduce)."""
        return {"one program": dict(self.plan.combine_kinds)}


def loop_collectives(compiled_or_text: Any) -> list:
    """The collectives of a compiled module that run inside a while loop (its body or condition,
    or computations they call)."""
    from tag_jax.hlo import collectives
    from tag_jax.hlo.compiled import _called, _parse_module

    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    comps, _ = _parse_module(text)
    inside: set[str] = set()
    todo = []
    for comp in comps.values():
        for ins in comp.instrs.values():
            if ins.opcode == "while":
                todo += [n for n in re.findall(r"\b(?:body|condition)=%?([\w.\-]+)", ins.attrs)]
    while todo:
        name = todo.pop()
        if name in inside or name not in comps:
            continue
        inside.add(name)
        for ins in comps[name].instrs.values():
            todo += _called(ins)
    return [c for c in collectives(text) if c.computation in inside]

