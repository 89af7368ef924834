"""Per-primitive sharding rules: the search space of the planner (house rule 7: rules are data).

    strategies(primitive, in_avals, out_avals, params, mesh_axes) -> tuple[OpStrategy, ...]
    for_graph(graph, mesh_axes)   -> one strategy tuple per op of an OpGraph (cached; ~0.1 s for GPT-2)
    registered()                  -> primitives with a real rule
    unknown_primitives(graph)     -> primitives of a graph that run replicated only for lack of a rule
    validate(primitive, in_avals, out_avals, params, mesh, strategy)  -> None, or raises RuleError
    validate_many(cases, mesh)    -> failure messages; many ops and strategies in one compile

Every strategy runs the op with no communication inside it; index 0 is always full replication,
but for a `shard_map` region, whose one option is its own specs (`manual.py`).
`mesh_axes` is a mapping of axis name to size (or a `Mesh` / `MeshSpec`); axes of size 1 are never
used, each axis splits at most one dimension of a tensor, two axes on one dimension go in mesh order,
and a dimension is split only by axes whose product divides it.

Rules describe ops with einsum-like factor labels (`Factors`, see `factors.py`): dot_general
``b,m,k x b,k,n -> b,m,n`` (k summed: a split k leaves a partial sum), elementwise ops, reductions,
data movement, gather/scatter, convolutions and pooling. Partial sums pass through the linear ops:
add/sub/add_any (all inputs partial alike), mul (one input partial), div (numerator), neg, copy,
stop_gradient, float convert_element_type, transpose, reshape, broadcast_in_dim, squeeze, rev, cumsum,
reduce_sum, scatter-add (operand and updates). Random bits from a typed key split freely (`random.py`). Embedding tables split on rows (vocabulary) too: a
lookup masks the rows a device lacks (partial output), a scatter-add drops updates for other rows
(out-of-range indices then give zeros instead of jax's fill or clip). while/cond run replicated, a scan also with a split carried through its body without
communication (`loops.py`) (bodies are priced
through sub-graphs); primitives with no rule run replicated and are listed by `unknown_primitives`.

On meshes of three or more usable axes the lists grow as (factors + 1) ** axes (GPT-2 small on 2x2x2:
up to ~300 per op); on 1-D and 2-D meshes they stay within a few dozen.
"""
from tag_jax.rules import contractions, control, elementwise, indexing, random, reductions, shapes  # noqa: F401
from tag_jax.rules.factors import Factors, enumerate_strategies, replicated_only
from tag_jax.rules.registry import (RuleError, factors, for_graph, mesh_axes_of, register, registered,
                                    rule_for, strategies, unknown_primitives)
from tag_jax.rules.validate import Case, primitive_named, validate, validate_many

__all__ = ["strategies", "for_graph", "registered", "unknown_primitives", "validate", "validate_many",
           "Case", "RuleError", "Factors", "register", "factors", "rule_for", "enumerate_strategies",
           "replicated_only", "primitive_named", "mesh_axes_of"]
