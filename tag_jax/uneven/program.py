"""Running an uneven plan in plain JAX: one jitted program per group, one to combine, one to apply.

    group g   jit(shard_map(grad_fn)) on the group's mesh ("data" axis): each device computes the
              mean-loss gradient of its b_g examples and keeps it (no collective); out (|g|, ...)
    combine   jit(shard_map) on all the plan's devices ("devices" axis): psum_k (b_k / N) * grad_k
              over every device k = the gradient of the mean loss over the global batch, exactly
    apply     jit(apply_fn) on all the plan's devices, state replicated

Arrays move between programs without copies: a group's per-device gradients become one row each of
a (devices, ...) array on the full mesh (`jax.make_array_from_single_device_arrays`), and the
replicated state is viewed on each group's sub-mesh the same way. Only addressable shards are
touched and host data enters through `jax.make_array_from_callback`, so the same code runs under
`jax.distributed` (every process passes the same global batch and state).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tag_jax.uneven.plan import UnevenPlan
from tag_jax.uneven.price import UnevenError, global_batch
from tag_jax.uneven.steps import UnevenStep


class UnevenProgram:
    """`program(state, batch) -> (new_state, metrics)` for an `UnevenPlan` (state replicated on the
    plan's devices: `shard_state` puts it there)."""

    def __init__(self, step: UnevenStep, plan: UnevenPlan, *, devices=None,
                 compiler_options: Mapping[str, Any] | None = None):
        devices = list(jax.devices() if devices is None else devices)
        for i in plan.device_ids:
            if not 0 <= i < len(devices):
                raise UnevenError(f"the plan uses device {i} but JAX has {len(devices)} device(s); "
                                  "plan for the devices this job sees")
        self.step, self.plan = step, plan
        auto = (AxisType.Auto,)
        self.mesh = Mesh(np.array([devices[i] for i in plan.device_ids]), ("devices",), axis_types=auto)
        self.group_meshes = tuple(Mesh(np.array([devices[i] for i in g.group.device_ids]), ("data",),
                                       axis_types=auto) for g in plan.groups)
        self.offsets = tuple(int(x) for x in np.cumsum((0,) + plan.shares)[:-1])
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P("devices"))
        # each device weighs its local mean gradient by its share of the global batch
        w = np.concatenate([np.full(g.group.size, g.local_batch / plan.batch, np.float32)
                            for g in plan.groups])
        self.weights = jax.make_array_from_callback(w.shape, self.rows, lambda idx: w[idx],
                                                    dtype=w.dtype)
        opts = dict(compiler_options or {})
        self._group_programs = tuple(self._group_program(m, opts) for m in self.group_meshes)
        self._combine = jax.jit(jax.shard_map(_weighted_sum, mesh=self.mesh,
                                              in_specs=(P("devices"), P("devices")), out_specs=P()),
                                out_shardings=self.replicated, compiler_options=opts or None)
        self._apply = jax.jit(step.apply_fn, in_shardings=(self.replicated, self.replicated),
                              out_shardings=self.replicated, compiler_options=opts or None)

    def _group_program(self, mesh: Mesh, opts):
        grad_fn = self.step.grad_fn

        def local(params, batch):  # this device's examples only; the rows are combined later
            # params marked device-varying: otherwise the transpose of their (invariant) use
            # psums the gradient over the group, summing where the combine must weigh
            params = jax.tree_util.tree_map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
            return jax.tree_util.tree_map(lambda x: x[None], grad_fn(params, batch))

        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")),
                       out_shardings=NamedSharding(mesh, P("data")), compiler_options=opts or None)

    # ---- placing data -------------------------------------------------------------------------
    def shard_state(self, state: Any) -> Any:
        """The state replicated on the plan's devices (from host values or arrays)."""
        return jax.tree_util.tree_map(lambda x: _put(x, self.replicated), state)

    def group_batches(self, batch: Any) -> tuple[Any, ...]:
        """Each group's slice of the global batch, split over its data axis."""
        n = global_batch(batch)
        if n != self.plan.batch:
            raise UnevenError(f"the plan splits a batch of {self.plan.batch} examples "
                              f"({self.plan.shares} per group); this batch has {n}: plan again for it")
        out = []
        for mesh, g, off in zip(self.group_meshes, self.plan.groups, self.offsets):
            sharding = NamedSharding(mesh, P("data"))
            out.append(jax.tree_util.tree_map(
                lambda x, s=sharding, o=off, k=g.share: _put(x, s, rows=(o, o + k)), batch))
        return tuple(out)

    def group_inputs(self, state: Any) -> tuple[Any, ...]:
        """What grad_fn reads from the state, viewed (not copied) on each group's mesh."""
        inputs = self.step.inputs(self.shard_state(state))
        return tuple(jax.tree_util.tree_map(lambda x, m=m: _restrict(x, NamedSharding(m, P())), inputs)
                     for m in self.group_meshes)

    # ---- the three programs -------------------------------------------------------------------
    def gradients(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """(grads, metrics) of the global batch, replicated on the plan's devices."""
        rows = [prog(x, b) for prog, x, b in zip(self._group_programs, self.group_inputs(state),
                                                  self.group_batches(batch))]
        return self._combine(self.weights, self.stack(rows))

    def stack(self, rows: list) -> Any:
        """The groups' per-device results as (devices, ...) arrays on the full mesh, no copies."""
        flat = [jax.tree_util.tree_flatten(r) for r in rows]
        tree = flat[0][1]
        for (_, t), g in zip(flat, self.plan.groups):
            if t != tree:
                raise UnevenError(f"group {g.group.name!r} returned gradients of structure {t}, "
                                  f"group {self.plan.groups[0].group.name!r} {tree}")
        leaves = []
        for k in range(len(flat[0][0])):
            parts = [s.data for leaves_g, _ in flat for s in _by_device(leaves_g[k])]
            shape = (len(self.plan.device_ids),) + tuple(flat[0][0][k].shape[1:])
            leaves.append(jax.make_array_from_single_device_arrays(shape, self.rows, parts,
                                                                 dtype=flat[0][0][k].dtype))
        return jax.tree_util.tree_unflatten(tree, leaves)

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        state = self.shard_state(state)
        grads, metrics = self.gradients(state, batch)
        return self._apply(state, grads), metrics

    # ---- compiled programs, for checking predictions ---------------------------------------------
    def compiled(self, state: Any, batch: Any) -> dict[str, Any]:
        """{"group <name>": ..., "combine": ..., "apply": ...} compiled on abstract inputs."""
        from tag_jax.plan import abstract

        out = {}
        state_a, n = abstract(state), global_batch(batch)
        if n != self.plan.batch:
            raise UnevenError(f"the plan is for a batch of {self.plan.batch}, not {n}")
        inputs_a = abstract(self.step.inputs(state_a))
        rows = []
        for prog, mesh, g in zip(self._group_programs, self.group_meshes, self.plan.groups):
            x = _sds(inputs_a, NamedSharding(mesh, P()))
            b = jax.tree_util.tree_map(
                lambda v, s=NamedSharding(mesh, P("data")), k=g.share:
                jax.ShapeDtypeStruct((k,) + tuple(v.shape[1:]), v.dtype, sharding=s), abstract(batch))
            lowered = prog.lower(x, b)
            out[f"group {g.group.name}"] = lowered.compile()
            rows.append(jax.eval_shape(prog, x, b))
        stacked = jax.tree_util.tree_map(
            lambda r: jax.ShapeDtypeStruct((len(self.plan.device_ids),) + tuple(r.shape[1:]), r.dtype,
                                           sharding=self.rows), rows[0])
        w = jax.ShapeDtypeStruct(self.weights.shape, self.weights.dtype, sharding=self.rows)
        out["combine"] = self._combine.lower(w, stacked).compile()
        grads = jax.eval_shape(self._combine, w, stacked)[0]
        out["apply"] = self._apply.lower(_sds(state_a, self.replicated),
                                         _sds(grads, self.replicated)).compile()
        return out

    def predicted_collectives(self) -> dict[str, dict[str, int]]:
        """Per program, the per-device collective bytes by kind the plan predicts."""
        out = {f"group {g.group.name}": {} for g in self.plan.groups}
        out["combine"] = {"all-reduce": self.plan.combine_bytes}
        out["apply"] = {}
        return out


def _weighted_sum(w, tree):
    return jax.tree_util.tree_map(lambda x: jax.lax.psum(x[0] * w[0].astype(x.dtype), "devices"), tree)


def _put(x, sharding: NamedSharding, rows: tuple[int, int] | None = None):
    """x (host value or array) as a global array with `sharding`; `rows` slices dimension 0 first."""
    if rows is None and isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if rows is None:
            return jax.device_put(x, sharding)
        raise UnevenError("under jax.distributed pass the global batch as host (numpy) data, the same "
                          "in every process; each process reads the rows of its own devices")
    value = np.asarray(x)
    if rows is not None:
        value = value[rows[0]:rows[1]]
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx],
                                        dtype=value.dtype)


def _restrict(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """A replicated array viewed on a subset of its devices (the same buffers)."""
    keep = {d: s.data for s in x.addressable_shards for d in [s.device]}
    mine = [keep[d] for d in sharding.addressable_devices if d in keep]
    if len(mine) != len(sharding.addressable_devices):
        return jax.device_put(x, sharding)
    return jax.make_array_from_single_device_arrays(x.shape, sharding, mine, dtype=x.dtype)


def _by_device(x: jax.Array) -> list:
    """Addressable shards in the order of the devices in the array's mesh."""
    order = {d: k for k, d in enumerate(x.sharding.mesh.devices.flat)}
    return sorted(x.addressable_shards, key=lambda s: order[s.device])


def _sds(tree, sharding):
    return jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), tree)
