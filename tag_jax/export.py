"""A plan's chosen shardings in the forms other JAX code takes: `PartitionSpec` pytrees and flax
logical axis rules (what MaxText-style code passes to `nn.logical_to_mesh_axes` /
`nn.logical_axis_rules`).

Parameters are the plan's arguments whose role is "parameter" (a path with a `params` component:
`state/params/dense_0/kernel`, `TrainState.params`, an nnx state passed as an argument named
`params`). A parameter's *key* is its path after the first `params` component, without the
trailing `value` nnx variables add: `state/params/dense_0/kernel` and `params/l1/kernel/value`
have the keys `dense_0/kernel` and `l1/kernel`.

Logical names, one per dimension of each parameter, come from one of:
- `names=`: the model's own names (a pytree of `PartitionSpec`/tuples as `nn.get_partition_spec`
  or `nnx.get_partition_spec` give for `with_logical_partitioning` models, a mapping key -> names,
  or a callable (key, shape) -> names);
- `naming="size"` (default): a dimension of size n is `"d{n}"`; the second dimension of that size in
  one tensor is `"d{n}_1"`, and so on (flax refuses a name twice in one array). Transformers reuse
  sizes for one logical axis (embed 768, mlp 3072, vocab 50257), so this usually gives a short table;
- `naming="path"`: `"{key}:{dim}"`, one name per dimension of each parameter: never conflicts.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from tag_jax.paths import nest

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


class LogicalAxisConflict(ValueError):
    """Two parameters give one logical axis different mesh axes."""


def partition_specs(plan, subtree: str | None = None) -> Any:
    """The plan's argument shardings as a pytree of `PartitionSpec` (same structure as
    `plan.in_shardings`: a tuple of the positional arguments).

    `subtree="params"`: the first subtree (breadth first) reached by a key of that name (dict key,
    attribute such as `TrainState.params`, nnx state key), with its own container types, so
    `jax.tree.map(f, state.params, specs)` lines up. A plan loaded without its function has no
    argument pytree: the result is then a dict path -> spec, or for `subtree` nested dicts.
    """
    if plan.graph is None:  # loaded from JSON: paths only
        if subtree is None:
            return specs_by_path(plan)
        return _nest(_keyed(specs_by_path(plan), subtree), plan, subtree)
    specs = jax.tree_util.tree_map(lambda s: s.spec, plan.in_shardings,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    if subtree is None:
        return specs
    found = _find_subtree(specs, subtree)
    if found is None:
        raise KeyError(f"no subtree named {subtree!r} in the arguments of {plan.function}; "
                       f"argument paths are e.g. {[a.path for a in plan.arguments[:3]]}")
    return found


def specs_by_path(plan) -> dict[str, PartitionSpec]:
    """{argument path: PartitionSpec}, e.g. {"state/params/dense_0/kernel": P(None, "model")}."""
    return {a.path: a.sharding.to_partition_spec() for a in plan.arguments}


def parameter_keys(plan) -> dict[str, Any]:
    """{parameter key: Argument} for the plan's parameters (see the module docstring)."""
    out = {}
    for a in plan.arguments:
        if a.role in ("parameter", "Role.PARAMETER"):
            out[_key(a.path)] = a
    if not out:
        raise ValueError(f"the plan of {plan.function} has no parameter arguments (none of "
                         f"{[a.path for a in plan.arguments[:4]]}... has a `params` component); "
                         "name the parameters' argument or dict key `params`")
    return out


def logical_names(plan, names: Any = None, *, naming: str = "size") -> dict[str, tuple]:
    """{parameter key: one logical name (or None) per dimension}, from `names` or `naming`."""
    params = parameter_keys(plan)
    if names is None:
        return {k: _derived(k, a.shape, naming) for k, a in params.items()}
    if callable(names) and not isinstance(names, Mapping):
        given = {k: tuple(names(k, a.shape)) for k, a in params.items()}
    else:
        given = _names_by_key(names)
    out = {}
    for k, a in params.items():
        if k not in given:
            raise KeyError(f"`names` has no logical names for parameter {a.path!r} (key {k!r}); "
                           f"it names e.g. {sorted(given)[:4]}")
        dims = tuple(given[k]) + (None,) * (len(a.shape) - len(given[k]))
        if len(dims) != len(a.shape):
            raise ValueError(f"`names` gives {len(given[k])} names for parameter {a.path!r} of "
                             f"shape {a.shape}; give one per dimension")
        out[k] = dims
    return out


def logical_axis_rules(plan, names: Any = None, *, naming: str = "size") -> Rules:
    """Flax logical axis rules ((logical name, mesh axes or None), ...) under which
    `nn.logical_to_mesh_axes(names_of_p, rules)` is the plan's spec of every parameter p.

    Names come from `names` or `naming` (module docstring). Raises `LogicalAxisConflict` naming both
    parameters when one logical axis is split differently in two of them, and ValueError when a
    split dimension has no logical name.
    """
    params = parameter_keys(plan)
    table = logical_names(plan, names, naming=naming)
    rules: dict[str, tuple[MeshAxes, str]] = {}  # name -> (mesh axes, the parameter that set it)
    for k, a in params.items():
        for dim, (name, axes) in enumerate(zip(table[k], a.sharding.dims)):
            mesh = _mesh_axes(axes)
            if name is None:
                if mesh is not None:
                    raise ValueError(f"dimension {dim} of parameter {a.path!r} {a.shape} has no "
                                     f"logical name but the plan splits it over {mesh!r}; name it")
                continue
            if name in rules and rules[name][0] != mesh:
                other_axes, other = rules[name]
                raise LogicalAxisConflict(
                    f"logical axis {name!r} is split over {mesh!r} in {a.path!r} (dim {dim}) but over "
                    f"{other_axes!r} in {other!r}: one rule cannot give both; use naming='path', or "
                    "pass names= that tell these dimensions apart")
            rules.setdefault(name, (mesh, a.path))
    return tuple((name, mesh) for name, (mesh, _) in rules.items())


# ---- helpers -------------------------------------------------------------------------------------

def _mesh_axes(dim: Sequence[str]) -> MeshAxes:
    return None if not dim else dim[0] if len(dim) == 1 else tuple(dim)


def _key(path: str) -> str:
    """The path after its first `params` component, without a trailing nnx `value`."""
    words = path.split("/")
    if "params" in words:
        words = words[words.index("params") + 1:]
    if len(words) > 1 and words[-1] == "value":
        words = words[:-1]
    return "/".join(words)


def _derived(key: str, shape: tuple[int, ...], naming: str) -> tuple[str, ...]:
    if naming == "path":
        return tuple(f"{key}:{d}" for d in range(len(shape)))
    if naming != "size":
        raise ValueError(f"unknown naming {naming!r}: use 'size', 'path' or pass names=")
    seen: dict[int, int] = {}
    out = []
    for n in shape:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(f"d{n}" if k == 0 else f"d{n}_{k}")
    return tuple(out)


def _is_names_leaf(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))


def _names_by_key(names: Any) -> dict[str, tuple]:
    from tag_jax.hlo.trace import _keystr  # the same path spelling as the plan's arguments

    leaves, _ = jax.tree_util.tree_flatten_with_path(
        names, is_leaf=lambda x: _is_names_leaf(x) or isinstance(x, list))
    flat = {_keystr(kp): v for kp, v in leaves}
    out = {}
    for path, v in flat.items():
        dims = []
        for e in tuple(v):
            if isinstance(e, (tuple, list)):  # flax allows one mesh axis per logical name only
                raise ValueError(f"`names` gives {tuple(e)} for one dimension of {path!r}; "
                                 "give one logical name (or None) per dimension")
            dims.append(e)
        out[_key(path)] = tuple(dims)
    return out


def _find_subtree(tree: Any, name: str) -> Any:
    """Breadth-first search for the child reached by a key named `name`."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0][0] == ():
            continue  # a leaf
        for kp, child in children:
            k = kp[-1]
            label = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
            if str(label) == name:
                return child
            if not isinstance(child, (PartitionSpec, NamedSharding)) and child is not None:
                queue.append(child)
    return None


def _keyed(by_path: Mapping[str, PartitionSpec], subtree: str) -> dict[str, PartitionSpec]:
    out = {}
    for path, spec in by_path.items():
        words = path.split("/")
        if subtree in words:
            out["/".join(words[words.index(subtree) + 1:])] = spec
    return out


def _nest(flat: Mapping[str, PartitionSpec], plan, subtree: str) -> dict:
    if not flat:
        raise KeyError(f"no argument path of {plan.function} has a {subtree!r} component")
    return nest(flat)

