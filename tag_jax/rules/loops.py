"""scan: options that carry a split through the loop without communication inside it.

Besides full replication, a scan may run with its carry split (a batch dimension, say, over
`data`): the body is walked op by op, each op taking the most-split option that reads its
operands as they lie (equal, or a free local slice of a replicated dimension; a partial sum only
where the option wants it partial), an op that reads only replicated values staying replicated.
Seeds: one dimension of the largest carry split over one mesh axis (or all of them), alone or
with the same dimension of every other carry and per-iteration slice of that extent. A seed is
kept when the carry comes back as it went in (iterated to a fixed point) and no op in the body
needed communication; the stacked inputs and outputs follow the body's slices, their leading
(iteration) dimension whole. Each iteration's work shrinks by the split; results are exact in
any layout (the partitioner carries the loop's shardings into its body). Partial outputs (a
weight gradient per layer from a split batch) are reduced where the plan says, priced like any
partial sum (XLA reduces them inside the loop: the same bytes). Splits that need communication
in the body (weights gathered per layer, FSDP-style) are not options; nested loops stay
replicated.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from tag_jax.strategy import OpStrategy, TensorSharding

_MAX_SEEDS = 12  # seeds tried per scan and mesh (each walks the body once or a few times)
_CACHE: dict = {}


def _readable(have: TensorSharding | None, want: TensorSharding) -> bool:
    """`want` read from `have` with no communication: the same partial axes, and every dimension
    split as in `have` or further (a slice of the replicated rest)."""
    if have is None:  # a constant: made in any layout
        return not want.partial
    if have.partial != want.partial or len(have.dims) != len(want.dims):
        return False
    return all(tuple(w[:len(h)]) == tuple(h) for h, w in zip(have.dims, want.dims))


def _walk(body, options, in_shardings, mesh_axes) -> tuple | None:
    """Shardings of the body's outputs when each op takes its most-split readable option, or
    None when some op cannot read its operands without communication."""
    have = dict(zip(body.inputs, in_shardings))
    for tid in body.constants:
        have[tid] = None
    for op, opts in zip(body.ops, options):
        if all(have.get(t) is None or have[t].is_replicated() for t in op.inputs):
            # nothing split flows in: stay replicated (splitting here, e.g. a bias broadcast
            # on its features, could only clash with the split flowing in further on)
            for t, o in zip(op.outputs, opts[0].outputs):
                have[t] = o
            continue
        best, best_par = None, -1
        for s in opts:
            if all(_readable(have.get(t), w) for t, w in zip(op.inputs, s.inputs)):
                par = math.prod(mesh_axes[a] for a in s.split_axes)
                if par > best_par:
                    best, best_par = s, par
        if best is None:
            return None
        for t, o in zip(op.outputs, best.outputs):
            have[t] = o
    out = []
    for t in body.outputs:
        s = have.get(t)
        out.append(TensorSharding.replicated(len(body.tensors[t].shape)) if s is None else s)
    return tuple(out)


def _groups(mesh_axes: Mapping[str, int]) -> list[tuple[str, ...]]:
    usable = tuple(a for a, n in mesh_axes.items() if n > 1)
    return [(a,) for a in usable] + ([usable] if len(usable) > 1 else [])


def scan_strategies(in_avals: Sequence[Any], out_avals: Sequence[Any], params: Mapping[str, Any],
                    mesh_axes: Mapping[str, int], replicated: tuple[OpStrategy, ...]) -> tuple[OpStrategy, ...]:
    key = (id(params["jaxpr"]), tuple(sorted(mesh_axes.items())))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is params["jaxpr"]:
        return hit[1]
    out = replicated + _split_options(params, mesh_axes)
    _CACHE[key] = (params["jaxpr"], out)  # the jaxpr kept alive: its id stays its own
    return out


def _split_options(params: Mapping[str, Any], mesh_axes: Mapping[str, int]) -> tuple[OpStrategy, ...]:
    from tag_jax.hlo.graph import Role
    from tag_jax.hlo.trace import trace_jaxpr
    from tag_jax.rules.registry import for_graph

    closed = params["jaxpr"]
    n_consts, n_carry = int(params["num_consts"]), int(params["num_carry"])
    jaxpr = getattr(closed, "jaxpr", closed)
    body = trace_jaxpr(closed, [Role.ACTIVATION] * len(jaxpr.invars), 1, "scan body")
    if any(op.subgraphs for op in body.ops):
        return ()  # nested loops: replicated only (their own options would need this walk inside)
    options = for_graph(body, mesh_axes)
    shapes = [body.tensors[t].shape for t in body.inputs]
    carry = list(range(n_consts, n_consts + n_carry))
    if not carry:
        return ()
    largest = max(carry, key=lambda i: math.prod(shapes[i]))
    seeds = [(g, d) for g in _groups(mesh_axes) for d in range(len(shapes[largest]))
             if shapes[largest][d] % math.prod(mesh_axes[a] for a in g) == 0
             and shapes[largest][d] > 1][:_MAX_SEEDS]
    found: dict = {}
    n = shapes[largest]
    for (group, dim), alike in [(sd, a) for sd in seeds for a in (True, False)]:
        ins = [TensorSharding.replicated(len(s)) for s in shapes]
        # the seed splits one dimension of the largest carry; `alike` also splits that
        # dimension of every other carry and per-iteration slice of the same extent there (a
        # batch dimension runs through them all: the backward loop's saved activations)
        for k in ([i for i in range(n_consts, len(shapes)) if len(shapes[i]) > dim
                   and shapes[i][dim] == n[dim]] if alike else [largest]):
            dims = [()] * len(shapes[k])
            dims[dim] = group
            ins[k] = TensorSharding(tuple(dims))
        for _ in range(3):  # the carry must come back as it went in
            outs = _walk(body, options, ins, mesh_axes)
            if outs is None:
                break
            back = list(outs[:n_carry])
            if all(b == ins[i] for b, i in zip(back, carry)):
                break
            if any(not _readable(ins[i], b) and not _readable(b, ins[i]) for b, i in zip(back, carry)):
                outs = None
                break
            for b, i in zip(back, carry):  # a carry that came back more split (or partial: an
                ins[i] = b                     # accumulator) starts so: its first value is local
        else:
            outs = None
        if outs is None or not all(b == ins[i] for b, i in zip(outs[:n_carry], carry)):
            continue
        if all(t.is_replicated() for t in ins + list(outs)):
            continue
        stacked_in = [TensorSharding(((),) + t.dims, t.partial) if k >= n_consts + n_carry else t
                      for k, t in enumerate(ins)]
        stacked_out = [TensorSharding(((),) + t.dims, t.partial) if k >= n_carry else t
                       for k, t in enumerate(outs)]
        key = (tuple(stacked_in), tuple(stacked_out))
        if key not in found:
            name = f"carry {dim}@{'.'.join(group)}"
            found[key] = OpStrategy(name, tuple(stacked_in), tuple(stacked_out))
    return tuple(found.values())
