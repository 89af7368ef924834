"""`auto_shard(fn, mesh)`: the planner behind a jit-like function."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from tag_jax.hlo.graph import OpGraph
from tag_jax.plan import Plan, ShardedFunction


def auto_shard(fn: Callable, mesh: Mesh | Sequence[Any] | None = None, *, topology=None,
               time_budget_s: float = 7.0, memory_limit: float | None = None, seed: int = 0,
               keep_device_order: bool = False, donate_argnums: int | Sequence[int] = (),
               static_argnums: int | Sequence[int] = (), roles=None, hand_written=None,
               progress: bool = False, compiler_options=None, policy="default",
               compression: str = "lossless", uneven: bool | str = "auto",
               plan: Any = None) -> ShardedFunction:
    """Plan `fn` for `mesh` on `topology` and return a jit-like function.

    `mesh`: a `jax.sharding.Mesh` (its axes and shape are kept; the planner chooses which device sits
    where unless `keep_device_order`), a list of devices, or None for all devices (the planner
    chooses the mesh shape and names its axes `data` and `model`; on mixed device kinds it may
    leave the slower devices out, unless `keep_device_order`: `plan.mesh` says which it uses). `topology` defaults to
    `Topology.detect()`. `memory_limit` (bytes per device) defaults to the smallest device memory of
    the topology times `tag_jax.cost.USABLE_MEMORY`. `time_budget_s` bounds the search and the
    compression choice; tracing and building the plan add about 3 s for GPT-2 small (its whole
    `.plan` on 8 devices at the default budget: 9.8 s on a quiet 2-core machine). Plans are made once per input signature
    (`.plan(*args)`, abstract arguments are fine). The search is seeded (`seed`), but its budget is
    wall-clock time, so a busier machine may stop it at another point and return another plan;
    `plan.save(path)` and `tag_jax.Plan.load(path, fn, *args)` reuse one plan exactly.
    `static_argnums` and `donate_argnums` work as `jax.jit`'s (one plan per value of the static
    arguments). Flax NNX modules and optimizers may be arguments, as `nnx.jit` takes them: their
    state is planned, and what the step does to them is written back (`tag_jax.nnx_objects`). `roles` maps argument paths or their prefixes (``"state/ema"``) to a role
    (`tag_jax.hlo.graph.Role` or its value: "parameter", "optimizer_state", "state", "batch"),
    overriding the guess from paths and Flax NNX variable types. `hand_written`: your own plan, as
    `jax.jit(in_shardings=...)` PartitionSpecs over `mesh`'s axes (a `Mesh` then), priced as one
    more seed, so the plan is never slower than it (its time is in `plan.search.seeds`).
    `policy`: the learned policy that seeds and steers the search (`tag_jax.policy`): "default"
    for the shipped weights (none if the package has none), None to search unguided, a
    `tag_jax.policy.Policy` or a weights path. With `time_budget_s=0` the policy's plan is used alone.
    `compression`: "lossless" (default) lets `tag_jax.search.compression` choose per gradient among
    the plain reduction, SFB and row-sparse exchange (never a slower plan than without), "lossy"
    also allows bf16/int8 psums (results change), "none" turns it off.
    `uneven`: for a step made by `tag_jax.uneven.split_step` (an `UnevenStep`), "auto" (default)
    also plans uneven work across groups of like devices on heterogeneous devices and runs it where
    the simulator prices it faster than one SPMD program; True always runs the uneven plan, False
    never (`tag_jax.uneven.auto`). Plain functions get one SPMD program.
    `plan`: a saved plan (its path, `Plan.to_dict()`'s dict or a `Plan`) to run instead of planning:
    each call's traced program must be the one it was made for (`PlanMismatchError` otherwise),
    with Flax NNX objects and static arguments handled as when planning; `topology`, if given,
    must be the one it was planned for.
    """
    from tag_jax.uneven.auto import check_uneven

    if plan is not None:
        return _with_saved_plan(fn, mesh, plan, topology, donate_argnums, static_argnums,
                                compiler_options, roles)
    use_uneven = check_uneven(fn, uneven)
    from tag_jax.search.compression import check_mode

    check_mode(compression)
    from tag_jax.policy import resolve

    guide = resolve(policy)
    from tag_jax.topology import Topology

    topo = Topology.detect() if topology is None else topology
    shape = names = None
    if hand_written is not None and not isinstance(mesh, Mesh):
        raise ValueError("auto_shard(hand_written=...): the specs name mesh axes, so pass the "
                         "jax.sharding.Mesh they are written for as `mesh`")
    if isinstance(mesh, Mesh):
        from tag_jax.emit.mesh import mesh_spec

        spec = mesh_spec(mesh)
        if spec.size == 0:
            raise ValueError("the mesh is empty; pass a Mesh with at least one device")
        device_ids = list(spec.device_ids)
        shape, names = spec.shape, spec.axis_names
    else:
        devices = list(jax.devices() if mesh is None else mesh)
        if not devices:
            raise ValueError("no devices to plan for: pass a Mesh or a non-empty list of devices")
        index = {d: k for k, d in enumerate(jax.devices())}
        device_ids = [index[d] for d in devices]
    if topo.num_devices < max(device_ids) + 1:
        from tag_jax.topology import TopologyError

        raise TopologyError(f"the mesh uses device ids up to {max(device_ids)} but topology "
                            f"'{topo.name}' describes only {topo.num_devices} devices")

    def planner(graph: OpGraph) -> Plan:
        from tag_jax.multihost import agreed_plan

        return agreed_plan(lambda: plan_here(graph), graph, topo)

    def plan_here(graph: OpGraph) -> Plan:
        from tag_jax.cost.simulate import USABLE_MEMORY
        from tag_jax.emit.mesh import make_mesh
        from tag_jax.search.planner import search
        from tag_jax import rules

        limit = memory_limit
        if limit is None:
            limit = USABLE_MEMORY * min(topo.device_memory(i) for i in device_ids)
        # without the user's limit, each mesh may fill its own devices (the search's meshes of
        # only the faster devices of a mixed cluster have more memory)
        per_mesh = {"memory_limit": None, "memory_fraction": USABLE_MEMORY} if memory_limit is None \
            else {"memory_limit": limit}
        # one budget for both: the search gets 80% of it, compression the rest (at least 0.5 s)
        search_s = time_budget_s * (0.8 if compression != "none" else 1.0)
        compress_s = max(0.5, time_budget_s - search_s)
        permute = not keep_device_order
        if any(op.primitive == "shard_map" for op in graph.ops):
            _check_manual_mesh(graph, mesh)
            permute = False  # the shard_map regions run on their mesh as written
        result = search(graph, topo, device_ids, mesh_shape=shape, axis_names=names,
                        time_budget_s=search_s, seed=seed, progress=progress,
                        permute=permute, policy=guide, given=hand_written, **per_mesh)
        strategy, cost, choices, uncompressed = result.strategy, result.cost, (), None
        if compression != "none":
            from tag_jax.search.compression import joint_select

            deadline = time.perf_counter() + compress_s
            if memory_limit is None:  # the chosen mesh's own devices (maybe only the faster ones)
                limit = USABLE_MEMORY * min(topo.device_memory(i) for i in result.strategy.mesh.device_ids)
            sel, _ = joint_select(graph, topo, result, device_ids, compression, mesh_shape=shape,
                                  axis_names=names, permute=permute, memory_limit=limit,
                                  deadline=deadline)
            if sel.choices and sel.cost.step_time_s < result.cost.step_time_s:
                name = sel.strategy.name
                name = name if name.startswith("tag_jax") else f"tag_jax ({name})"
                strategy = dataclasses.replace(sel.strategy, name=name)
                cost, choices, uncompressed = sel.cost, sel.choices, result.cost
        op_strategies = rules.for_graph(graph, strategy.mesh.axes)
        plan = Plan.build(graph, strategy, op_strategies, topo, jax_mesh=make_mesh(strategy.mesh),
                          cost=cost, compression=choices, uncompressed_cost=uncompressed)
        object.__setattr__(plan, "search", result)  # how the plan was found, for summaries
        return plan

    spmd = ShardedFunction(fn, planner, donate_argnums=donate_argnums, static_argnums=static_argnums,
                           compiler_options=compiler_options, roles=roles)
    if not use_uneven:
        return spmd
    if static_argnums not in ((), None):
        raise ValueError(f"auto_shard(static_argnums={static_argnums!r}): an UnevenStep takes (state, "
                         "batch) only; bind static values in its loss function, or pass uneven=False")
    from tag_jax.uneven.auto import UnevenFunction

    return UnevenFunction(fn, spmd, topo, device_ids, mode=uneven, memory_limit=memory_limit,
                          compiler_options=compiler_options)


def _check_manual_mesh(graph: OpGraph, mesh: Any) -> None:
    """A step with shard_map regions is planned on their mesh, as given: axes and device order."""
    from tag_jax.emit.mesh import mesh_spec

    for op in graph.ops:
        if op.primitive != "shard_map":
            continue
        own = mesh_spec(op.params["mesh"])
        given = mesh_spec(mesh) if isinstance(mesh, Mesh) else None
        if given != own:
            what = (f"mesh {dict(zip(given.axis_names, given.shape))} over devices "
                    f"{list(given.device_ids)}" if given is not None else
                    "a list of devices" if mesh is not None else "no mesh")
            raise ValueError(f"{op.where()} runs on mesh {dict(zip(own.axis_names, own.shape))} over "
                             f"devices {list(own.device_ids)}, but auto_shard was given {what}: pass "
                             "the shard_map's own jax.sharding.Mesh as `mesh` (its axes and device "
                             "order are kept)")


def _with_saved_plan(fn, mesh, saved, topology, donate_argnums, static_argnums, compiler_options,
                     roles) -> ShardedFunction:
    """A ShardedFunction whose planner reloads `saved` for each traced graph (checked to match)."""
    import json

    if isinstance(saved, Plan):
        d, source = saved.to_dict(), f"the plan of {saved.function}"
    elif isinstance(saved, dict):
        d, source = saved, "the plan"
    else:
        with open(saved) as f:
            d = json.load(f)
        source = str(saved)
    if isinstance(d, dict) and isinstance(d.get("mesh"), dict) and mesh is not None:
        wanted = set(d["mesh"].get("device_ids", ()))
        if isinstance(mesh, Mesh):
            from tag_jax.emit.mesh import mesh_spec

            given = set(mesh_spec(mesh).device_ids)
        else:
            index = {dev: k for k, dev in enumerate(jax.devices())}
            given = {index[dev] for dev in mesh}
        if not wanted <= given:
            raise ValueError(f"{source} runs on devices {sorted(wanted)}, but the mesh given to "
                             f"auto_shard has {sorted(given)}: pass the devices it was planned for "
                             "(or mesh=None), or plan anew")

    def planner(graph: OpGraph) -> Plan:
        return Plan.from_dict(d, graph=graph, topology=topology, source=source)

    return ShardedFunction(fn, planner, donate_argnums=donate_argnums, static_argnums=static_argnums,
                           compiler_options=compiler_options, roles=roles)
