"""Elementwise ops: every output dimension is a factor; size-1 (broadcast) and scalar inputs follow.

Linear ones pass partial sums through: ``add``/``sub``/``add_any`` with all inputs partial over the
same axes, ``mul`` with exactly one partial input, ``div`` with a partial numerator, ``neg``, ``copy``,
``stop_gradient`` and float-to-float ``convert_element_type``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tag_jax.rules.factors import Factors
from tag_jax.rules.registry import register

ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp "
    "clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 "
    "expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le lgamma log log1p "
    "logistic lt max min mul ne neg nextafter not or polygamma population_count pow random_gamma_grad "
    "real reduce_precision regularized_incomplete_beta rem round rsqrt select_n shift_left "
    "shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh "
    "threefry2x32 xor zeta"
).split()

_ALL_PARTIAL = {"add", "sub", "add_any"}
_UNARY_LINEAR = {"neg", "copy", "copy_p", "stop_gradient"}


def _floating(aval) -> bool:
    return np.issubdtype(np.dtype(aval.dtype), np.inexact)


def _rule(linear_kind):
    def rule(in_avals, out_avals, params):
        shape = tuple(out_avals[0].shape)
        out = tuple(f"d{i}" if n > 1 else None for i, n in enumerate(shape))
        ins = []
        for a in in_avals:
            s = tuple(a.shape)
            if len(s) != len(shape):
                ins.append((None,) * len(s))
            else:
                ins.append(tuple(lab if n == m else None for lab, n, m in zip(out, s, shape)))
        linear = linear_kind(in_avals, out_avals)
        return Factors(tuple(ins), (out,) * len(out_avals), linear=linear)
    return rule


def _none(in_avals, out_avals):
    return ()


def _all(in_avals, out_avals):
    return (tuple(range(len(in_avals))),)


def _first(in_avals, out_avals):
    return ((0,),)


def _either(in_avals, out_avals):
    return tuple((i,) for i in range(len(in_avals)))


def _div(in_avals, out_avals):
    return ((0,),) if _floating(out_avals[0]) else ()  # integer division is not linear


def _convert(in_avals, out_avals):
    return ((0,),) if _floating(in_avals[0]) and _floating(out_avals[0]) else ()


for _name in ELEMENTWISE:
    kind = (_all if _name in _ALL_PARTIAL else _first if _name in _UNARY_LINEAR else _div if _name == "div"
            else _either if _name == "mul" else _convert if _name == "convert_element_type" else _none)
    register(_name, uses_params=False)(_rule(kind))


@register("bitcast_convert_type", uses_params=False)
def _bitcast(in_avals, out_avals, params):
    if tuple(in_avals[0].shape) == tuple(out_avals[0].shape):  # same element width
        return _rule(_none)(in_avals, out_avals, params)
    a, b = tuple(in_avals[0].shape), tuple(out_avals[0].shape)
    n = min(len(a), len(b))  # the width change adds or drops a minor dim; the others line up
    labs = tuple(f"d{i}" if a[i] > 1 else None for i in range(n - (len(a) == len(b))))
    pad = lambda s: labs + (None,) * (len(s) - len(labs))
    return Factors((pad(a),), (pad(b),))


@register("sharding_constraint", uses_params=False)
def _user_constraint(in_avals, out_avals, params):
    # a `with_sharding_constraint` in the user's step is a layout hint for their own mesh: the plan
    # chooses every layout, so it is the identity here (any layout, partial sums pass) and
    # `tag_jax.hlo.evaluate` drops it from the emitted program
    f = _rule(_first)(in_avals, out_avals, params)
    return dataclasses.replace(f, impl=lambda p, args, strategy, mesh_axes: list(args))
