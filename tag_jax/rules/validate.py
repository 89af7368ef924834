"""Ground truth for rules: run a strategy under `jax.shard_map` and compare with the unsharded op.

Each device runs the primitive on its local blocks (with the rule's localised params), partial outputs
are `psum`-med over their axes, and every copy of every output block must equal the unsharded op's
result (floats to rtol 1e-5 / atol 1e-6, integers and booleans exactly). Partial inputs are fed as
random pieces that sum exactly to the global value, so a rule that wrongly passes a partial sum
through a non-linear op fails. Several strategies (and several ops) share one compile.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tag_jax.rules.registry import RuleError, factors
from tag_jax.strategy import OpStrategy


@dataclasses.dataclass(frozen=True)
class Case:
    """One op and the strategies of it to check."""

    primitive: Any  # a name or a jax Primitive
    in_avals: tuple
    out_avals: tuple
    params: Mapping[str, Any]
    strategies: tuple[OpStrategy, ...]


def fast_compile_options() -> dict:
    """Quick-compiling XLA options for validating rules (`tag_jax.models.fast_compile_options`
    documents them and the XLA flag that must come with them)."""
    options: dict = {"xla_backend_optimization_level": 0}
    if jax.default_backend() == "cpu":
        options["xla_cpu_use_fusion_emitters"] = False
    return options


_PRIMS: dict[str, Any] = {}


def primitive_named(name: str) -> Any:
    """The jax Primitive called `name` (searched in jax's lax modules once)."""
    if not _PRIMS:
        from jax._src import core
        import jax._src.lax as lax_pkg
        for m in pkgutil.walk_packages(lax_pkg.__path__, "jax._src.lax."):
            try:
                mod = importlib.import_module(m.name)
            except Exception:  # optional backends
                continue
            for v in vars(mod).values():
                if isinstance(v, core.Primitive):
                    _PRIMS.setdefault(v.name, v)
        import jax.extend.core.primitives as extra
        for v in vars(extra).values():
            if isinstance(v, core.Primitive):
                _PRIMS.setdefault(v.name, v)
    if name not in _PRIMS:
        raise RuleError(f"no jax primitive named `{name}`; pass the Primitive object (eqn.primitive)")
    return _PRIMS[name]


def validate(primitive: Any, in_avals: Sequence[Any], out_avals: Sequence[Any],
             params: Mapping[str, Any], mesh: Mesh, strategy: OpStrategy) -> None:
    """Raise `RuleError` unless `strategy` computes the op exactly on `mesh`."""
    failures = validate_many([Case(primitive, tuple(in_avals), tuple(out_avals), params, (strategy,))],
                             mesh)
    if failures:
        raise RuleError(failures[0])


def validate_many(cases: Sequence[Case], mesh: Mesh, seed: int = 0,
                  compiler_options: Mapping[str, Any] | None = None) -> list[str]:
    """Check every strategy of every case in one compile; return one message per failure."""
    rng = np.random.default_rng(seed)
    mesh_axes = dict(mesh.shape)
    failures: list[str] = []
    runs = []  # (case index, strategy, shard_mapped fn, args)
    refs = []  # per case: (prim, params, global inputs)
    for ci, case in enumerate(cases):
        prim = case.primitive if not isinstance(case.primitive, str) else primitive_named(case.primitive)
        name = prim.name
        f = factors(name, case.in_avals, case.out_avals, case.params)
        xs = [_random(a, rng, _bound(f, i)) for i, a in enumerate(case.in_avals)]
        refs.append((prim, dict(case.params), xs))
        for s in case.strategies:
            where = f"`{name}` strategy {s.name!r} on mesh {mesh_axes}"
            try:
                _check_structure(s, case, mesh_axes)
                fn, args = _sharded(prim, f, case, s, mesh, xs, rng)
                shapes = jax.eval_shape(fn, *args)
                for k, (got, t, a) in enumerate(zip(shapes, s.outputs, case.out_avals)):
                    want = (math.prod(mesh_axes[x] for x in mesh.axis_names if x not in t.axes),
                            *a.shape)
                    if tuple(got.shape) != want:
                        local = t.local_shape(a.shape, mesh_axes)
                        raise RuleError(f"output {k}: the op on local blocks gives shape "
                                        f"{tuple(got.shape)[1:]} per device, so the blocks do not "
                                        f"tile its shape {tuple(a.shape)} as {t} ({local} each)")
            except RuleError as e:
                failures.append(f"{where}: {e}")
                continue
            except Exception as e:  # a local computation that does not even trace
                failures.append(f"{where}: the op does not run on local blocks: {type(e).__name__}: {e}")
                continue
            runs.append((ci, s, fn, args))

    def program(ref_args, run_args):
        ref_outs = [_bind(p, params, x) for (p, params, _), x in zip(refs, ref_args)]
        return ref_outs, [fn(*a) for (_, _, fn, _), a in zip(runs, run_args)]

    opts = dict(fast_compile_options() if compiler_options is None else compiler_options)
    ref_outs, run_outs = jax.jit(program, compiler_options=opts)(
        [x for _, _, x in refs], [a for _, _, _, a in runs])
    for (ci, s, _, _), outs in zip(runs, run_outs):
        name = refs[ci][0].name
        for k, (got, want) in enumerate(zip(outs, ref_outs[ci])):
            got, want = _numpy(got), _numpy(want)
            for r in range(got.shape[0]):
                problem = _compare(got[r], want)
                if problem:
                    failures.append(f"`{name}` strategy {s.name!r} on mesh {mesh_axes}: output {k} "
                                    f"({s.outputs[k]}, shape {want.shape}) differs from the unsharded op "
                                    f"on replica {r}: {problem}; the rule is wrong for this strategy")
                    break
    return failures


def _bind(prim, params, args):
    out = prim.bind(*args, **params)
    return list(out) if prim.multiple_results else [out]


def _bound(f, i: int) -> int | None:
    return f.index_bounds[i] if i < len(f.index_bounds) else None


def _random(aval, rng, bound):
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):  # typed PRNG keys
        impl = getattr(aval.dtype, "_impl", None)  # (no public accessor from the dtype)
        words = tuple(impl.key_shape) if impl is not None else (2,)  # threefry: two words
        data = rng.integers(0, 2**32, size=tuple(aval.shape) + words, dtype=np.uint32)
        return jax.random.wrap_key_data(data, **({"impl": impl} if impl is not None else {}))
    shape, dtype = tuple(aval.shape), np.dtype(aval.dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        lo, hi = (0, bound) if bound is not None else (1, 4)
        return rng.integers(lo, max(hi, lo + 1), size=shape).astype(dtype)
    # dyadic values k/8 in [0.5, 1.5]: sums and products of a few are exact in float32
    value = rng.integers(4, 13, size=shape) / 8.0
    if np.issubdtype(dtype, np.complexfloating):  # both parts, so a lost imaginary part shows
        value = value + 1j * (rng.integers(4, 13, size=shape) / 8.0)
    return value.astype(dtype)


def _numpy(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):  # keys compare by their words
        x = jax.random.key_data(x)
    return np.asarray(x)


def _pieces(x, n: int, rng):
    """`n` random pieces whose sum is exactly `x` (dyadic floats or integers)."""
    if x.dtype == np.bool_:
        raise RuleError("a boolean tensor cannot be a partial sum")
    if np.issubdtype(x.dtype, np.integer):
        rest = rng.integers(-3, 4, size=(n - 1,) + x.shape).astype(x.dtype)
    else:
        rest = (rng.integers(-8, 9, size=(n - 1,) + x.shape) / 8.0).astype(x.dtype)
    last = (x - rest.sum(axis=0, dtype=x.dtype)).astype(x.dtype)
    return np.concatenate([rest, last[None]], axis=0)


def _entry(d: tuple[str, ...]):
    return None if not d else d[0] if len(d) == 1 else d


def _sharded(prim, f, case: Case, s: OpStrategy, mesh: Mesh, xs, rng):
    mesh_axes = dict(mesh.shape)
    in_specs, args = [], []
    for x, t in zip(xs, s.inputs):
        dims = [_entry(d) for d in t.dims]
        if t.partial:
            args.append(_pieces(x, math.prod(mesh_axes[a] for a in t.partial), rng))
            in_specs.append(PartitionSpec(_entry(t.partial), *dims))
        else:
            args.append(x)
            in_specs.append(PartitionSpec(*dims))
    out_specs = []
    for t in s.outputs:
        rest = tuple(a for a in mesh.axis_names if a not in t.axes)
        out_specs.append(PartitionSpec(_entry(rest), *[_entry(d) for d in t.dims]))
    in_local = [t.local_shape(a.shape, mesh_axes) for a, t in zip(case.in_avals, s.inputs)]
    out_local = [t.local_shape(a.shape, mesh_axes) for a, t in zip(case.out_avals, s.outputs)]
    params = dict(case.params)
    if f.local is not None:
        params = dict(f.local(params, in_local, out_local))
    for k in ("sharding", "out_sharding"):
        if k in params:
            params[k] = None

    def local(*blocks):
        blocks = [b[0] if t.partial else b for b, t in zip(blocks, s.inputs)]
        outs = (f.impl(params, blocks, s, mesh_axes) if f.impl is not None
                else _bind(prim, params, blocks))
        res = []
        for o, t in zip(outs, s.outputs):
            if t.partial:
                o = jax.lax.psum(o, t.partial)
            res.append(o[None])
        return res

    fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)
    return fn, args


def _check_structure(s: OpStrategy, case: Case, mesh_axes: Mapping[str, int]) -> None:
    if len(s.inputs) != len(case.in_avals) or len(s.outputs) != len(case.out_avals):
        raise RuleError(f"has {len(s.inputs)} input / {len(s.outputs)} output shardings for an op with "
                        f"{len(case.in_avals)} inputs / {len(case.out_avals)} outputs")
    for kind, ts, avals in (("input", s.inputs, case.in_avals), ("output", s.outputs, case.out_avals)):
        for i, (t, a) in enumerate(zip(ts, avals)):
            shape = tuple(a.shape)
            if len(t.dims) != len(shape):
                raise RuleError(f"{kind} {i} sharding {t} has {len(t.dims)} dims for shape {shape}")
            used = t.axes + t.partial
            unknown = [x for x in used if x not in mesh_axes]
            if unknown:
                raise RuleError(f"{kind} {i} sharding {t} names axes {unknown} not in the mesh")
            if len(set(used)) != len(used):
                raise RuleError(f"{kind} {i} sharding {t} uses a mesh axis twice")
            for n, d in zip(shape, t.dims):
                k = math.prod(mesh_axes[x] for x in d)
                if n % k:
                    raise RuleError(f"{kind} {i} sharding {t}: dimension of size {n} is not divisible "
                                    f"by {k} (axes {d})")


def _compare(got, want) -> str | None:
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if np.issubdtype(want.dtype, np.inexact):
        tight = np.dtype(want.dtype).itemsize >= 4
        rtol, atol = (1e-5, 1e-6) if tight else (1e-2, 1e-2)
        wide = np.complex128 if np.issubdtype(want.dtype, np.complexfloating) else np.float64
        g, w = got.astype(wide), want.astype(wide)
        bad = ~np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            i = np.unravel_index(np.argmax(bad), bad.shape)
            return f"{int(bad.sum())} of {bad.size} values differ, e.g. at {tuple(map(int, i))}: {g[i]} vs {w[i]}"
        return None
    bad = got != want
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        return f"{int(bad.sum())} of {bad.size} values differ, e.g. at {tuple(map(int, i))}: {got[i]} vs {want[i]}"
    return None
