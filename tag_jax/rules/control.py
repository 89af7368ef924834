"""Control flow (while, cond; scan too, besides the splits of `loops.py`) runs replicated: a strategy for a loop would have to fix the
shardings of its whole body; the planner prices the body's ops through the op's sub-graphs instead."""
from __future__ import annotations

from tag_jax.rules.factors import replicated_only
from tag_jax.rules.registry import register


@register("scan", "while", "cond", uses_params=False)
def _control(in_avals, out_avals, params):
    return replicated_only([len(getattr(a, "shape", ())) for a in in_avals],
                           [len(getattr(a, "shape", ())) for a in out_avals])
