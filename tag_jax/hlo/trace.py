"""`trace(fn, *args) -> OpGraph`: the op graph of one call of a JAX function.

Works on abstract inputs (`jax.ShapeDtypeStruct`): nothing is allocated. Call-like nested jaxprs
(jit, custom_jvp/custom_vjp, remat/checkpoint) are inlined so that the planner sees every op;
control flow (cond, while, scan, and so Flax `nn.scan`) stays one op whose cost is its body's times the
trip count, with the bodies kept as sub-graphs.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from tag_jax.hlo import flops as _flops
from tag_jax.hlo.graph import Op, OpGraph, Role, Tensor, source_of


class TraceError(ValueError):
    """The function uses something the planner cannot describe; the message says what and where."""


# Call-like primitives whose body is inlined (param holding the body).
_INLINE = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
}

_UNSUPPORTED = {
    "pure_callback": "a host callback runs Python on one device; its cost and sharding are unknown. "
                     "Move it outside the function you plan, or replace it with jax.numpy code",
    "io_callback": "an I/O callback is a side effect; keep it outside the planned step",
    "xla_pmap": "pmap is manual multi-device code; use a plain function and let tag_jax shard it",
}

# Argument names and path words that mark a batch input when nothing else says so.
_BATCH_WORDS = {"batch", "inputs", "input", "x", "xs", "tokens", "images", "labels", "targets", "data", "y"}


def trace(fn: Callable, *args: Any, static_argnums: Sequence[int] | int = (),
          roles: Mapping[str, str | Role] | None = None, name: str | None = None,
          **kwargs: Any) -> OpGraph:
    """Trace `fn(*args, **kwargs)` into an `OpGraph`.

    `args` may hold concrete arrays or `jax.ShapeDtypeStruct`s. `roles` maps an argument name or a
    path prefix (``"state/params"``) to a `Role`, overriding the guess made from paths (``params`` ->
    parameter, ``opt_state`` -> optimizer state, arguments named like ``batch`` -> batch input).
    """
    if isinstance(static_argnums, int):
        static_argnums = (static_argnums,)
    static_argnums = tuple(i % len(args) if args else i for i in static_argnums)
    name = name or getattr(fn, "__name__", type(fn).__name__)
    try:
        closed, out_shape = jax.make_jaxpr(fn, static_argnums=static_argnums, return_shape=True)(
            *args, **kwargs)
    except TraceError:
        raise
    except Exception as exc:  # surface what JAX said, with which function it was
        hint = ""
        if "not a valid JAX type" in str(exc):
            hint = ("; a planned function takes and returns arrays (pytrees of arrays): pass other "
                    "arguments via static_argnums and compute non-array results outside it")
        elif "in_specs passed to shard_map" in str(exc):
            hint = ("; tag_jax traces the step on shapes alone (the plan chooses the layouts), so a "
                    "shard_map inside it needs a mesh with Auto axes: jax.make_mesh(shape, names, "
                    "axis_types=(jax.sharding.AxisType.Auto,) * len(names))")
        elif "of type Auto" in str(exc) or "reshard" in str(exc):
            hint = ("; tag_jax chooses the layouts itself and traces the step with Auto mesh axes, "
                    "so explicit-sharding calls inside it (out_sharding=..., jax.sharding.reshard) "
                    "cannot run: drop them from the step you plan (with_sharding_constraint hints "
                    "are fine)")
        raise TraceError(f"tracing {name} failed: {type(exc).__name__}: {exc}{hint}") from exc

    arg_names = _argument_names(fn, len(args))
    dyn = tuple(a for i, a in enumerate(args) if i not in static_argnums)
    dyn_names = tuple(n for i, n in enumerate(arg_names) if i not in static_argnums)
    flat_in, in_tree = jax.tree_util.tree_flatten_with_path((dyn, kwargs))
    if len(flat_in) != len(closed.jaxpr.invars):
        raise TraceError(f"{name}: {len(flat_in)} array arguments but the jaxpr has "
                         f"{len(closed.jaxpr.invars)} inputs; pass non-array arguments via static_argnums")
    in_paths = [_input_path(kp, dyn_names) for kp, _ in flat_in]
    hints = _variable_roles((dyn, kwargs))
    flat_out, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    out_paths = ["out" + ("/" + _keystr(kp) if kp else "") for kp, _ in flat_out]

    b = _Builder()
    env: dict[Any, int] = {}
    inputs = []
    unsure = []  # inputs whose role only the fallback gave (no name, type or override said)
    for var, path, hint in zip(closed.jaxpr.invars, in_paths, hints):
        role = _known_role(path, roles or {}, hint)
        if role is None and getattr(var.aval, "shape", ()):
            unsure.append(len(b.tensors))
        role = role or _fallback_role(path)
        if role == Role.BATCH and not getattr(var.aval, "shape", ()):
            role = Role.STATE  # a scalar has no batch dimension (a step counter, an RNG key)
        tid = b.new_tensor(var.aval, role, path=path)
        env[var] = tid
        inputs.append(tid)
    for var, value in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = b.constant(var.aval, value)
    b.walk(closed.jaxpr, env, trips=1, scope="")
    outputs = [b.read(env, v) for v in closed.jaxpr.outvars]
    for tid, path in zip(outputs, out_paths):
        if b.tensors[tid]["producer"] is not None and b.tensors[tid]["path"] is None:
            b.tensors[tid].update(role=Role.OUTPUT, path=path)
    _roles_from_dataflow(b, unsure, outputs, out_paths)
    _, in_treedef = jax.tree_util.tree_flatten((dyn, kwargs))
    return b.freeze(inputs, outputs, in_treedef, jax.tree_util.tree_structure(out_shape), name)


def trace_jaxpr(jaxpr: ClosedJaxpr | Jaxpr, in_roles: Sequence[Role], trips: int = 1,
                name: str = "body") -> OpGraph:
    """The op graph of a jaxpr on its own (used for loop bodies)."""
    b = _Builder()
    closed = jaxpr if isinstance(jaxpr, ClosedJaxpr) else ClosedJaxpr(jaxpr, ())
    env: dict[Any, int] = {}
    inputs = [b.new_tensor(v.aval, r) for v, r in zip(closed.jaxpr.invars, in_roles)]
    env.update(zip(closed.jaxpr.invars, inputs))
    for var, value in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = b.constant(var.aval, value)
    b.walk(closed.jaxpr, env, trips=trips, scope="")
    outputs = [b.read(env, v) for v in closed.jaxpr.outvars]
    return b.freeze(inputs, outputs, None, None, name)


def storage_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype a tensor is priced with. JAX's extended dtypes (typed PRNG keys from
    `jax.random.key`) have no numpy counterpart: they count as opaque items of their size."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return np.dtype(f"V{dtype.itemsize}")
    return np.dtype(dtype)


class _Builder:
    """Accumulates tensors and ops while walking jaxprs; `freeze` makes the immutable graph."""

    def __init__(self) -> None:
        self.tensors: list[dict] = []
        self.ops: list[Op] = []
        self.constants: dict[int, Any] = {}

    def new_tensor(self, aval: Any, role: Role, path: str | None = None,
                   producer: int | None = None) -> int:
        shape = tuple(int(d) for d in getattr(aval, "shape", ()))
        dtype = storage_dtype(getattr(aval, "dtype", np.float32))
        self.tensors.append(dict(shape=shape, dtype=dtype, role=role, path=path, producer=producer,
                                 consumers=[]))
        return len(self.tensors) - 1

    def constant(self, aval: Any, value: Any) -> int:
        tid = self.new_tensor(aval, Role.CONSTANT)
        self.constants[tid] = value
        return tid

    def read(self, env: dict, var: Any) -> int:
        if isinstance(var, Literal):
            return self.constant(var.aval, var.val)
        return env[var]

    def walk(self, jaxpr: Jaxpr, env: dict, trips: int, scope: str) -> None:
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            ins = [self.read(env, v) for v in eqn.invars]
            eqn_scope = _join(scope, str(eqn.source_info.name_stack))
            if prim in _UNSUPPORTED or (prim.endswith("callback") and prim != "debug_callback"):
                reason = _UNSUPPORTED.get(prim, "a host callback cannot be planned")
                raise TraceError(f"unsupported primitive `{prim}` at {source_of(eqn)}: {reason}.")
            if prim in _INLINE and _INLINE[prim] in eqn.params:
                self._inline(eqn, ins, env, trips, eqn_scope)
                continue
            self._add_op(eqn, ins, env, trips, eqn_scope)

    def _inline(self, eqn: Any, ins: list[int], env: dict, trips: int, scope: str) -> None:
        body = eqn.params[_INLINE[eqn.primitive.name]]
        closed = body if isinstance(body, ClosedJaxpr) else ClosedJaxpr(body, ())
        inner: dict[Any, int] = dict(zip(closed.jaxpr.invars, ins))
        for var, value in zip(closed.jaxpr.constvars, closed.consts):
            inner[var] = self.constant(var.aval, value)
        self.walk(closed.jaxpr, inner, trips, scope)
        for outer, inner_out in zip(eqn.outvars, closed.jaxpr.outvars):
            env[outer] = self.read(inner, inner_out)

    def _add_op(self, eqn: Any, ins: list[int], env: dict, trips: int, scope: str) -> None:
        prim = eqn.primitive.name
        in_avals = [v.aval for v in eqn.invars]
        out_avals = [v.aval for v in eqn.outvars]
        in_roles = [self.tensors[t]["role"] for t in ins]
        subgraphs, inner_trips, known = self._bodies(eqn, in_roles, trips)
        if subgraphs:
            flops = (max(g.flops for g in subgraphs) if prim == "cond" else sum(g.flops for g in subgraphs))
            moved = (max(g.bytes for g in subgraphs) if prim == "cond" else sum(g.bytes for g in subgraphs))
            if prim == "shard_map":  # the body runs on every device: its work, as if split that way
                k = shard_map_devices(eqn)
                flops, moved = flops * k, moved * k
        else:
            flops = trips * _flops.primitive_flops(prim, in_avals, out_avals, eqn.params)
            moved = trips * _flops.bytes_moved(in_avals, out_avals)
        role = _result_role(scope, in_roles)
        op_id = len(self.ops)
        outs = [self.new_tensor(a, role, producer=op_id) for a in out_avals]
        for tid in ins:
            self.tensors[tid]["consumers"].append(op_id)
        env.update(zip(eqn.outvars, outs))
        self.ops.append(Op(id=op_id, primitive=prim, inputs=tuple(ins), outputs=tuple(outs),
                           flops=flops, bytes=moved, trips=trips * inner_trips, scope=scope,
                           subgraphs=subgraphs, trips_known=known, eqn=eqn))

    def _bodies(self, eqn: Any, in_roles: list[Role], trips: int) -> tuple[tuple[OpGraph, ...], int, bool]:
        """Sub-graphs of control flow, already multiplied by their trip counts."""
        prim, p = eqn.primitive.name, eqn.params
        if prim == "scan":
            n = trips * int(p["length"])
            return (trace_jaxpr(p["jaxpr"], in_roles, n, "scan body"),), int(p["length"]), True
        if prim == "cond":
            branch_roles = in_roles[1:]
            return tuple(trace_jaxpr(br, branch_roles, trips, f"cond branch {i}")
                         for i, br in enumerate(p["branches"])), 1, True
        if prim == "shard_map":
            check_shard_map(eqn)
            return (trace_jaxpr(p["jaxpr"], in_roles, trips, "shard_map body"),), 1, True
        if prim == "while":
            count = _while_trip_count(eqn, self)
            n = trips * (count or 1)
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            carry = in_roles[nc + nb:]
            body = trace_jaxpr(p["body_jaxpr"], in_roles[nc:nc + nb] + carry, n, "while body")
            cond = trace_jaxpr(p["cond_jaxpr"], in_roles[:nc] + carry, n, "while cond")
            return (body, cond), count or 1, count is not None
        return (), 1, True

    def freeze(self, inputs, outputs, in_tree, out_tree, name) -> OpGraph:
        tensors = tuple(Tensor(id=i, consumers=tuple(d.pop("consumers")), **d)
                        for i, d in enumerate(self.tensors))
        return OpGraph(ops=tuple(self.ops), tensors=tensors, inputs=tuple(inputs),
                       outputs=tuple(outputs), in_tree=in_tree, out_tree=out_tree, name=name,
                       constants=dict(self.constants))


def shard_map_devices(eqn: Any) -> int:
    """Devices among which a shard_map splits its work: the product of the mesh axes its specs
    name (the others hold copies), as the rule's option splits the op over them."""
    return math.prod(eqn.params["mesh"].shape[a] for a in shard_map_axes(eqn))


def shard_map_axes(eqn: Any) -> tuple[str, ...]:
    """Mesh axes named by a shard_map's in_specs and out_specs, in mesh order."""
    named = set()
    for spec in tuple(eqn.params["in_specs"]) + tuple(eqn.params["out_specs"]):
        for entry in spec:
            named.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
    return tuple(a for a in eqn.params["mesh"].axis_names if a in named)


def check_shard_map(eqn: Any) -> None:
    """A shard_map is planned as one fixed op over its own mesh: all of that mesh's axes manual."""
    mesh, manual = eqn.params["mesh"], eqn.params.get("newly_manual_axes")
    if manual is not None and set(manual) != set(mesh.axis_names):
        auto = sorted(set(mesh.axis_names) - set(manual))
        raise TraceError(f"shard_map at {source_of(eqn)} leaves mesh axes {auto} to the compiler "
                         "(axis_names=...); tag_jax plans shard_map regions that are manual over "
                         "every axis of their mesh: drop axis_names, or plan the code around it")


def _while_trip_count(eqn: Any, b: _Builder) -> int | None:
    """Trip count of a `lt(i, n)` counted loop with constant bounds and step 1, else None."""
    p = eqn.params
    cond = p["cond_jaxpr"].jaxpr
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return None
    carry_vars = cond.invars[nc:]
    lhs, rhs = cond.eqns[0].invars
    if lhs not in carry_vars:
        return None
    k = carry_vars.index(lhs)
    body = p["body_jaxpr"].jaxpr
    incremented = any(e.primitive.name == "add" and body.invars[nb + k] in e.invars
                      and any(isinstance(v, Literal) and v.val == 1 for v in e.invars)
                      and e.outvars[0] == body.outvars[k] for e in body.eqns)
    if not incremented:
        return None
    outer = eqn.invars

    def value(v: Any) -> Any:
        if isinstance(v, Literal):
            return v.val
        if v in cond.invars:  # a cond constant, or a carry: read what the loop was started with
            j = cond.invars.index(v)
            return value(outer[j] if j < nc else outer[nb + j])
        return None

    lo, hi = value(outer[nc + nb + k]), value(rhs)
    if lo is None or hi is None:
        return None
    return max(0, int(hi) - int(lo))


def _result_role(scope: str, in_roles: list[Role]) -> Role:
    if "transpose(" in scope:
        return Role.GRADIENT
    if any(r in (Role.GRADIENT, Role.UPDATE, Role.OPTIMIZER_STATE) for r in in_roles):
        return Role.UPDATE
    return Role.ACTIVATION


def _variable_roles(tree: Any) -> list[Role | None]:
    """Per array leaf of `tree`, the role its Flax NNX variable type gives it (`nnx.Param`:
    parameter; `nnx.OptState` and its kinds, `nnx.Optimizer`'s: optimizer state; any other
    variable, e.g. batch statistics or an RNG stream: state), None outside NNX variables. The
    type says what a leaf is whatever the user named the argument holding it."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return [None] * len(jax.tree_util.tree_leaves(tree))
    opt_state = getattr(nnx, "OptState", ())
    out: list[Role | None] = []
    for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if not isinstance(node, nnx.Variable):
            out.append(None)
            continue
        role = (Role.PARAMETER if isinstance(node, nnx.Param) else
                Role.OPTIMIZER_STATE if opt_state and isinstance(node, opt_state) else Role.STATE)
        out.extend([role] * len(jax.tree_util.tree_leaves(node)))
    return out


def _known_role(path: str, roles: Mapping[str, str | Role], hint: Role | None = None) -> Role | None:
    """The role the user's override, a Flax NNX variable type (`hint`) or the path's words give;
    None when none of them says."""
    best = None
    for prefix, role in roles.items():  # the longest matching prefix wins
        if (path == prefix or path.startswith(prefix.rstrip("/") + "/")) and (
                best is None or len(prefix) > len(best[0])):
            try:
                best = (prefix, Role(role))
            except ValueError:
                raise TraceError(f"roles={{{prefix!r}: {role!r}}}: {role!r} is not a role; an input is "
                                 f"one of 'parameter', 'optimizer_state', 'state', 'batch'") from None
    if best:
        return best[1]
    if hint is not None:
        return hint
    words = path.split("/")
    if "opt_state" in words:
        return Role.OPTIMIZER_STATE
    if "params" in words:
        return Role.PARAMETER
    if words[0] in _BATCH_WORDS or any(w in _BATCH_WORDS for w in words[:2]):
        return Role.BATCH
    return None


def _fallback_role(path: str) -> Role:
    return Role.STATE if path.split("/")[0] in ("state", "train_state") else Role.BATCH


def _scoped(op: Op, pass_name: str) -> bool:
    """Whether the op, or an op of its loop/branch bodies, is in the forward ("jvp") or backward
    ("transpose") pass of a differentiated function, by JAX's name stack."""
    if pass_name == "transpose":
        here = "transpose(" in op.scope
    else:
        here = "jvp(" in op.scope and "transpose(" not in op.scope
    return here or any(_scoped(o, pass_name) for g in op.subgraphs for o in g.ops)


def _roles_from_dataflow(b: "_Builder", unsure: Sequence[int], outputs: Sequence[int],
                         out_paths: Sequence[str]) -> None:
    """Roles of the inputs no name said anything about (`def step(carry, x)` with `carry =
    (params, opt_state)`), from what the step does with them. An input the step returns updated
    (a result of its shape and dtype whose path ends with the input's path below its argument;
    for a whole argument, `def step(w, x)`, a whole result made from gradients) from values of a
    backward pass is a parameter if the forward pass reads it, else optimizer state (Adam's
    moments); one it returns otherwise is state (batch-norm statistics, counters); the rest keep
    the fallback (batch)."""
    if not unsure:
        return
    carried_from_grads: set[int] = set()  # tensors computed from a backward pass, through anything
    for op in b.ops:
        if _scoped(op, "transpose") or any(t in carried_from_grads for t in op.inputs):
            carried_from_grads.update(op.outputs)
    for tid in unsure:
        t = b.tensors[tid]
        tail = tuple(t["path"].split("/")[1:])
        if tail:
            ends = [p for p in out_paths if tuple(p.split("/"))[-len(tail):] == tail]
        else:  # a whole argument (`def step(w, x)`): a whole result, `out` or `out/<k>`
            ends = [p for p in out_paths if len(p.split("/")) <= 2]
        hits = [o for o, p in zip(outputs, out_paths) if p in ends
                and b.tensors[o]["shape"] == t["shape"] and b.tensors[o]["dtype"] == t["dtype"]]
        if len(hits) != 1 or (not tail and hits[0] not in carried_from_grads):
            continue  # (a whole result of the same shape proves little unless gradients made it)
        if hits[0] in carried_from_grads and t["dtype"].kind == "f":
            read_forward = any(_scoped(b.ops[c], "jvp") for c in t["consumers"])
            t["role"] = Role.PARAMETER if read_forward else Role.OPTIMIZER_STATE
        else:
            t["role"] = Role.STATE


def _argument_names(fn: Callable, n: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY,
                                                  params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"arg{i}")
    return names


def _input_path(keypath: tuple, dyn_names: Sequence[str]) -> str:
    # keypath starts with (SequenceKey(0 = args | 1 = kwargs), SequenceKey(i) | DictKey(name), ...)
    head, rest = keypath[0], keypath[1:]
    if getattr(head, "idx", 0) == 0:
        first = dyn_names[rest[0].idx]
    else:
        first = str(rest[0].key)
    tail = _keystr(rest[1:])
    return first + ("/" + tail if tail else "")


def _keystr(keypath: tuple) -> str:
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _join(outer: str, inner: str) -> str:
    return f"{outer}/{inner}" if outer and inner else outer or inner
