"""The collectives a shard_map body issues, as `Comm`s the simulator prices like any other.

Each collective's per-device result bytes, as `tag_jax.hlo` reads them from the compiled program:
psum/pmax/pmin an all-reduce of the local operand, all_gather the gathered result, psum_scatter
the kept shard, all_to_all the local buffer, ppermute what each device sends. Nested jits are
walked; a scan body counts once per iteration. The axes are the mesh axes the collective runs over
(a size-1 axis moves nothing and is dropped).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from tag_jax.cost.reshard import Comm

_KIND = {"psum": "all-reduce", "psum_invariant": "all-reduce", "pmax": "all-reduce",
         "pmin": "all-reduce", "all_gather": "all-gather", "all_gather_invariant": "all-gather",
         "reduce_scatter": "reduce-scatter", "all_to_all": "all-to-all",
         "ppermute": "collective-permute"}
_RESULT = {"all-gather", "reduce-scatter"}  # priced by their result; the others by the operand


def _nbytes(aval: Any) -> int:
    return int(math.prod(aval.shape) * np.dtype(aval.dtype).itemsize)


def _axes(params: Mapping[str, Any], sizes: Mapping[str, int]) -> tuple[str, ...]:
    names = params.get("axes", params.get("axis_name", ()))
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(a for a in names if sizes.get(a, 1) > 1)


def body_comms(eqn: Any) -> tuple[Comm, ...]:
    """The collectives of one call of a shard_map equation's body."""
    sizes = dict(zip(eqn.params["mesh"].axis_names, eqn.params["mesh"].axis_sizes))
    out: list[Comm] = []

    def walk(jaxpr: Any, times: int) -> None:
        for e in jaxpr.eqns:
            name = e.primitive.name
            kind = _KIND.get(name)
            if kind is not None:
                axes = _axes(e.params, sizes)
                if axes:
                    avals = e.outvars if kind in _RESULT else e.invars
                    for v in avals:
                        out.extend([Comm(kind, axes, _nbytes(v.aval))] * times)
                continue
            if name in ("pjit", "jit", "closed_call", "remat", "checkpoint", "custom_jvp_call",
                        "custom_vjp_call"):
                for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                    sub = e.params.get(key)
                    if sub is not None:
                        walk(getattr(sub, "jaxpr", sub), times)
                        break
            elif name == "scan":
                walk(e.params["jaxpr"].jaxpr, times * int(e.params["length"]))

    walk(eqn.params["jaxpr"], 1)
    return tuple(out)
