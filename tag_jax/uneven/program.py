"""Running an uneven plan in plain JAX: one jitted program per group, one to combine, one to apply.

The layout (`tag_jax.uneven.layout`, the plan's `local` = L) puts the plan's devices on a mesh
("groups", "local") of sub-groups of L devices, and each group's devices on a mesh ("data", "local"):

    group g   jit(shard_map(grad_fn)) on the group's mesh: all-gather the parameter shards over
              "local", then each device computes the mean-loss gradient of its b_g examples and
              keeps it; out (|g|, ...), one row per device
    combine   jit(shard_map) on all the plan's devices: (b_k / N) * grad_k on every device k,
              reduce-scattered over "local" and all-reduced over "groups" (one all-reduce over all
              devices for leaves L does not divide) = the gradient of the mean loss over the global
              batch, exactly, sharded like the state
    apply     jit(apply_fn) on all the plan's devices, state and gradients sharded over "local"

With L = 1 the state is replicated and the combine one all-reduce over all devices.

Arrays move between programs without copies: a group's per-device gradients become one row each of
a (devices, ...) array on the full mesh (`jax.make_array_from_single_device_arrays`), and the
replicated state is viewed on each group's sub-mesh the same way. Only addressable shards are
touched and host data enters through `jax.make_array_from_callback`, so the same code runs under
`jax.distributed` (every process passes the same global batch and state).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tag_jax.uneven import layout
from tag_jax.uneven.plan import UnevenPlan
from tag_jax.uneven.price import UnevenError, global_batch
from tag_jax.uneven.steps import UnevenStep


def plan_devices(plan: UnevenPlan, devices=None) -> list:
    """The jax devices a plan runs on (default: `jax.devices()`), checked to hold its device ids."""
    devices = list(jax.devices() if devices is None else devices)
    for i in plan.device_ids:
        if not 0 <= i < len(devices):
            raise UnevenError(f"the plan uses device {i} but JAX has {len(devices)} device(s); "
                              "plan for the devices this job sees")
    return devices


ROWS = ("groups", "local")   # one device per row of the (devices, ...) gradient arrays
ROWS_G = ("data", "local")   # the same within a group's mesh


class UnevenProgram:
    """`program(state, batch) -> (new_state, metrics)` for an `UnevenPlan` (state replicated on the
    plan's devices: `shard_state` puts it there). For a mode-"one" plan it is a `OneProgram`
    (`tag_jax.uneven.one_program`): one program over all the plan's devices."""

    def __new__(cls, step: UnevenStep, plan: UnevenPlan, **kwargs):
        if cls is UnevenProgram and plan.group_program == "one":
            from tag_jax.uneven.one_program import OneProgram

            return OneProgram(step, plan, **kwargs)
        return super().__new__(cls)

    def __init__(self, step: UnevenStep, plan: UnevenPlan, *, devices=None,
                 compiler_options: Mapping[str, Any] | None = None):
        devices = plan_devices(plan, devices)
        self.step, self.plan = step, plan
        L = self.local = plan.local
        auto = (AxisType.Auto, AxisType.Auto)
        rows = layout.sub_groups([g.group.device_ids for g in plan.groups], L)
        self.mesh = Mesh(np.array([[devices[i] for i in r] for r in rows]), ("groups", "local"),
                         axis_types=auto)
        self.group_meshes = tuple(
            Mesh(np.array([devices[i] for i in g.group.device_ids]).reshape(-1, L), ("data", "local"),
                 axis_types=auto) for g in plan.groups)
        self.offsets = tuple(int(x) for x in np.cumsum((0,) + plan.shares)[:-1])
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(ROWS))
        # rows: each device weighs its local mean gradient by its share of the global batch;
        # spmd: each holds its group's mean gradient (column 0: a chunk, the same on the group's
        # |g| / L sub-groups; column 1: a whole leaf, the same on all |g| devices)
        self.spmd = plan.group_program == "spmd"
        if self.spmd:
            w = np.concatenate([np.tile([g.share / plan.batch / (g.group.size // L),
                                         g.share / plan.batch / g.group.size], (g.group.size, 1))
                                for g in plan.groups]).astype(np.float32)
        else:
            w = np.concatenate([np.full((g.group.size, 2), g.local_batch / plan.batch, np.float32)
                                for g in plan.groups])
        self.weights = jax.make_array_from_callback(w.shape, self.rows, lambda idx: w[idx],
                                                    dtype=w.dtype)
        self.opts = opts = dict(compiler_options or {})
        if self.spmd:
            if any(g.strategy is None for g in plan.groups):
                raise UnevenError("this uneven plan runs SPMD group programs but carries no group "
                                  "strategies; make it with tag_jax.uneven.plan_uneven")
            self._group_programs = tuple(self._spmd_group_program(g.strategy, m)
                                         for g, m in zip(plan.groups, self.group_meshes))
        else:
            self._group_programs = tuple(self._group_program(m) for m in self.group_meshes)
        self._combine = {}
        self._apply = {}

    def sharding(self, x, mesh: Mesh | None = None) -> NamedSharding:
        """The layout's sharding of a state, gradient or parameter leaf (see `layout`)."""
        return NamedSharding(self.mesh if mesh is None else mesh, layout.spec(np.shape(x), self.local))

    def _group_program(self, mesh: Mesh):
        grad_fn, L = self.step.grad_fn, self.local

        def local(dims, params, batch):  # this device's examples only; rows are combined later
            def whole(p, k):
                if k is not None:  # p is this device's shard; k: its sharded dimension
                    p = jax.lax.all_gather(p, "local", axis=k, tiled=True)
                # params marked device-varying: otherwise the transpose of their (invariant) use
                # psums the gradient over the group, summing where the combine must weigh
                missing = tuple(a for a in ("data", "local") if a not in varying_axes(p))
                return jax.lax.pcast(p, missing, to="varying") if missing else p

            params = jax.tree_util.tree_map(whole, params, dims)
            return jax.tree_util.tree_map(lambda x: x[None], grad_fn(params, batch))

        def program(params, batch):
            dims = jax.tree_util.tree_map(lambda p: layout.shard_dim(p.shape, L), params)
            specs = jax.tree_util.tree_map(lambda p: layout.spec(p.shape, L), params)
            f = jax.shard_map(functools.partial(local, dims), mesh=mesh, in_specs=(specs, P(ROWS_G)),
                              out_specs=P(ROWS_G))
            return f(params, batch)

        return jax.jit(program, out_shardings=NamedSharding(mesh, P(ROWS_G)),
                       compiler_options=self.opts or None)

    def _spmd_group_program(self, gs, mesh: Mesh):
        """The group's own SPMD program (`group_spmd`), its results as one row per device."""
        from tag_jax.plan import Plan

        # the planned program's own mesh: the group's devices in the same order, its axes of
        # size 1 left out (`group_spmd`)
        own = Mesh(np.asarray(mesh.devices).reshape(gs.mesh.shape), gs.mesh.axis_names,
                   axis_types=(AxisType.Auto,) * len(gs.mesh.shape))
        plan = Plan.build(gs.graph, gs.strategy, gs.ops, None, jax_mesh=own, cost=gs.cost)
        planned = plan.jit(compiler_options=self.opts or None)
        L = self.local

        def row(v):  # v whole (the group's mean gradient): keep this device's chunk of the layout
            k = layout.shard_dim(v.shape, L)
            if k is not None:
                n = v.shape[k] // L
                v = jax.lax.dynamic_slice_in_dim(v, jax.lax.axis_index("local") * n, n, axis=k)
            missing = tuple(a for a in ("data", "local") if a not in varying_axes(v))
            v = jax.lax.pcast(v, missing, to="varying") if missing else v
            return v[None]

        def whole(p):  # this device's shard -> the whole parameter on every device of the group
            k = layout.shard_dim(p.shape, L)
            if k is None:
                return p
            return jax.shard_map(lambda v: jax.lax.all_gather(v, "local", axis=k, tiled=True),
                                 mesh=mesh, in_specs=layout.spec(p.shape, L), out_specs=P(),
                                 check_vma=False)(p)

        def program(params, batch):
            out = planned(jax.tree_util.tree_map(whole, params), batch)
            return jax.tree_util.tree_map(
                lambda x: jax.shard_map(row, mesh=mesh, in_specs=P(), out_specs=P(ROWS_G))(x), out)

        # inputs come in the layout (group_inputs, group_batches) and keep it: no in_shardings
        return jax.jit(program,
                       out_shardings=NamedSharding(mesh, P(ROWS_G)), compiler_options=self.opts or None)

    def _combine_program(self, rows: Any, shapes: Any):
        L, reduced = self.local, self.spmd

        def combine(w, tree):
            # every leaf's weighted rows in one buffer per (kind, dtype): one collective each
            # instead of one per leaf (exact: concatenating and splitting move no values)
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            full = [tuple(s.shape) for s in jax.tree_util.tree_leaves(shapes)]
            kinds = layout.buckets(full, [x.dtype for x in leaves], L)
            sharded_leaf = {i for (sh, _), idx in kinds if sh for i in idx}
            xs = [x[0] * w[0, 0 if i in sharded_leaf else 1].astype(x.dtype) for i, x in enumerate(leaves)]
            out = [None] * len(xs)
            for (sharded, _), idx in kinds:
                if sharded and reduced:  # each device holds its chunk of its group's gradient
                    red = jax.lax.psum(jnp.concatenate([xs[i].reshape(-1) for i in idx]), "groups")
                    cuts = np.cumsum([xs[i].size for i in idx])[:-1]
                    for i, piece in zip(idx, jnp.split(red, cuts)):
                        out[i] = piece.reshape(xs[i].shape)
                elif sharded:  # rows of L chunks along the leaf's sharded dimension, side by side
                    dims = [layout.shard_dim(xs[i].shape, L) for i in idx]
                    parts = [jnp.moveaxis(xs[i], k, 0).reshape(L, -1) for i, k in zip(idx, dims)]
                    red = jax.lax.psum_scatter(jnp.concatenate(parts, axis=1), "local",
                                               scatter_dimension=0, tiled=True)
                    red = jax.lax.psum(red, "groups")
                    cuts = np.cumsum([p.shape[1] for p in parts])[:-1]
                    for i, k, piece in zip(idx, dims, jnp.split(red, cuts, axis=1)):
                        moved = jnp.moveaxis(jnp.zeros(xs[i].shape, xs[i].dtype), k, 0).shape
                        piece = piece.reshape((moved[0] // L,) + moved[1:])
                        out[i] = jnp.moveaxis(piece, 0, k)
                else:
                    flat = jnp.concatenate([xs[i].reshape(-1) for i in idx])
                    red = jax.lax.psum(flat, ("groups", "local"))
                    cuts = np.cumsum([xs[i].size for i in idx])[:-1]
                    for i, piece in zip(idx, jnp.split(red, cuts)):
                        out[i] = piece.reshape(xs[i].shape)
            return jax.tree_util.tree_unflatten(treedef, out)

        out = jax.tree_util.tree_map(lambda r: layout.spec(r.shape, L), shapes)
        f = jax.shard_map(combine, mesh=self.mesh, in_specs=(P(ROWS), P(ROWS)), out_specs=out)
        shardings = jax.tree_util.tree_map(lambda s: NamedSharding(self.mesh, s), out)
        return jax.jit(f, out_shardings=shardings, compiler_options=self.opts or None)

    def combine(self, rows: Any, shapes: Any = None):
        """The combining program for these rows; `shapes`: the gradients' and metrics' global
        shapes (the rows' own shapes in mode "rows"; needed in mode "spmd", whose rows are chunks)."""
        from tag_jax.plan import signature

        key = signature(rows)
        if key not in self._combine:
            if shapes is None:
                if self.spmd:
                    raise UnevenError("the combining program of SPMD group programs needs the "
                                      "gradients' global shapes")
                shapes = jax.tree_util.tree_map(lambda r: jax.ShapeDtypeStruct(r.shape[1:], r.dtype), rows)
            self._combine[key] = self._combine_program(rows, shapes)
        return self._combine[key]

    def global_shapes(self, inputs: Any, batch: Any) -> Any:
        """(grads, metrics) shapes of the global batch (what the combine returns)."""
        from tag_jax.plan import abstract
        from tag_jax.uneven.price import batch_at

        return jax.eval_shape(self.step.grad_fn, abstract(inputs), batch_at(batch, 1))

    def apply(self, state: Any, grads: Any):
        from tag_jax.plan import signature

        key = signature((state, grads))
        if key not in self._apply:
            sh = lambda t: jax.tree_util.tree_map(self.sharding, t)  # noqa: E731
            self._apply[key] = jax.jit(self.step.apply_fn, in_shardings=(sh(state), sh(grads)),
                                       out_shardings=sh(state), compiler_options=self.opts or None)
        return self._apply[key]

    # ---- placing data -------------------------------------------------------------------------
    def shard_state(self, state: Any) -> Any:
        """The state on the plan's devices in the layout's sharding (from host values or arrays)."""
        return jax.tree_util.tree_map(lambda x: _put(x, self.sharding(x)), state)

    def group_batches(self, batch: Any) -> tuple[Any, ...]:
        """Each group's slice of the global batch, split over its data axis."""
        n = global_batch(batch)
        if n != self.plan.batch:
            raise UnevenError(f"the plan splits a batch of {self.plan.batch} examples "
                              f"({self.plan.shares} per group); this batch has {n}: plan again for it")
        out = []
        for mesh, g, off in zip(self.group_meshes, self.plan.groups, self.offsets):
            sharding = NamedSharding(mesh, P(ROWS_G))
            out.append(jax.tree_util.tree_map(
                lambda x, s=sharding, o=off, k=g.share: _put(x, s, rows=(o, o + k)), batch))
        return tuple(out)

    def group_inputs(self, state: Any) -> tuple[Any, ...]:
        """What grad_fn reads from the state, viewed (not copied) on each group's mesh."""
        inputs = self.step.inputs(self.shard_state(state))
        return tuple(jax.tree_util.tree_map(lambda x, m=m: _restrict(x, self.sharding(x, m)), inputs)
                     for m in self.group_meshes)

    # ---- the three programs -------------------------------------------------------------------
    def gradients(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """(grads, metrics) of the global batch, replicated on the plan's devices."""
        inputs = self.group_inputs(state)
        rows = [prog(x, b) for prog, x, b in zip(self._group_programs, inputs, self.group_batches(batch))]
        stacked = self.stack(rows)
        shapes = self.global_shapes(inputs[0], batch) if self.spmd else None
        return self.combine(stacked, shapes)(self.weights, stacked)

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
        return self.apply(state, grads)(state, grads), metrics

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
            x = jax.tree_util.tree_map(lambda v, m=mesh: _sd(v, self.sharding(v, m)), inputs_a)
            b = jax.tree_util.tree_map(
                lambda v, s=NamedSharding(mesh, P(ROWS_G)), k=g.share:
                jax.ShapeDtypeStruct((k,) + tuple(v.shape[1:]), v.dtype, sharding=s), abstract(batch))
            out[f"group {g.group.name}"] = prog.lower(x, b).compile()
            rows.append(jax.eval_shape(prog, x, b))
        stacked = jax.tree_util.tree_map(
            lambda r: jax.ShapeDtypeStruct((len(self.plan.device_ids),) + tuple(r.shape[1:]), r.dtype,
                                           sharding=self.rows), rows[0])
        w = jax.ShapeDtypeStruct(self.weights.shape, self.weights.dtype, sharding=self.rows)
        combine = self.combine(stacked, self.global_shapes(inputs_a, batch) if self.spmd else None)
        out["combine"] = combine.lower(w, stacked).compile()
        grads = abstract(jax.eval_shape(combine, w, stacked)[0])
        sa = jax.tree_util.tree_map(lambda v: _sd(v, self.sharding(v)), state_a)
        ga = jax.tree_util.tree_map(lambda v: _sd(v, self.sharding(v)), grads)
        out["apply"] = self.apply(state_a, grads).lower(sa, ga).compile()
        return out

    def predicted_collectives(self) -> dict[str, dict[str, int]]:
        """Per program, the per-device collective bytes by kind the plan predicts."""
        out = {f"group {g.group.name}": dict(g.collective_pairs)
               if g.collective_pairs or self.spmd else dict(self.plan.gather) for g in self.plan.groups}
        out["combine"] = dict(self.plan.combine_kinds)
        out["apply"] = {}
        return out


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
    value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)  # python ints
    if rows is not None:
        value = value[rows[0]:rows[1]]
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx],
                                        dtype=value.dtype)


def _restrict(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """An array viewed on a subset of its devices (the same buffers): every device of `sharding`
    must hold the same slice in `x` as `sharding` gives it (else the data is moved)."""
    keep = {s.device: s for s in x.addressable_shards}
    want = sharding.addressable_devices_indices_map(x.shape)
    have = x.sharding.devices_indices_map(x.shape)
    mine = []
    for d in sharding.mesh.devices.flat:
        if d not in want:
            continue
        if d not in keep or _norm(have[d], x.shape) != _norm(want[d], x.shape):
            return jax.device_put(x, sharding)
        mine.append(keep[d].data)
    return jax.make_array_from_single_device_arrays(x.shape, sharding, mine, dtype=x.dtype)


def _norm(index, shape) -> tuple:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def _by_device(x: jax.Array) -> list:
    """Addressable shards in the order of the devices in the array's mesh."""
    order = {d: k for k, d in enumerate(x.sharding.mesh.devices.flat)}
    return sorted(x.addressable_shards, key=lambda s: order[s.device])


def _sd(v, sharding):
    return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)


def varying_axes(x) -> frozenset:
    """The mesh axes a value inside shard_map varies along."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)
