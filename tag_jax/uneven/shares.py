"""Batch shares: the mixed-integer program that balances the groups' step times.

Group g doing n_g examples takes t_g(n_g) = fixed_g + per_example_g * n_g seconds (its compute and
its own gradient sync; `price.group_model` fits the two numbers to the simulator). The groups run at
once, so the slowest sets the pace:

    minimise T  subject to  fixed_g + per_example_g * d_g * k_g <= T     for every group g
                            sum_g d_g * k_g = N                          (the global batch)
                            1 <= k_g <= max_g / d_g,  k_g integer        (n_g = d_g k_g)

d_g is the size of group g's data axis: a group's share must split evenly over its devices, which
is why this is a MILP and not an LP (`scipy.optimize.milp`; the LP relaxation gives the ideal
continuous shares n_g = (T - fixed_g) / per_example_g). max_g bounds the share by memory.

Where several splits reach the same T (a group whose time hardly grows with its share, as on tiny
programs where fixed costs dominate), a second program keeps T within a part in 10^6 of the optimum
and minimises the largest per-device load k_g: the most even split among the fastest, not whichever
vertex the solver meets first (which put 44 of 48 examples on one of two identical groups).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


class SharesError(ValueError):
    """No split of the batch satisfies the groups; the message says which constraint fails."""


@dataclasses.dataclass(frozen=True)
class GroupModel:
    """What the MILP knows of one group: its time model, divisibility and memory bound."""

    name: str
    fixed_s: float          # seconds that do not grow with the share (gradient sync, optimizer)
    per_example_s: float    # seconds per example of its share
    multiple: int = 1       # the share must be a multiple of this (the group's data-axis size)
    max_share: int | None = None  # largest share that fits in memory (None: no bound)

    def time(self, n: int) -> float:
        return self.fixed_s + self.per_example_s * n if n else 0.0


@dataclasses.dataclass(frozen=True)
class Shares:
    shares: tuple[int, ...]   # examples per group, in the order of the models
    step_s: float             # the MILP's T: the slowest group's predicted time
    relaxed: tuple[float, ...]  # the LP relaxation's continuous shares (what integrality costs)


def solve_shares(models: Sequence[GroupModel], batch: int) -> Shares:
    """The integral shares minimising the slowest group's time (see the module docstring)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    models = tuple(models)
    _check(models, batch)
    G = len(models)
    d = np.array([m.multiple for m in models], float)
    b = np.array([m.per_example_s for m in models], float)
    a = np.array([m.fixed_s for m in models], float)
    hi = np.array([batch // m.multiple if m.max_share is None else m.max_share // m.multiple
                   for m in models], float)
    # variables: k_1..k_G, T
    c = np.r_[np.zeros(G), 1.0]
    rows = np.hstack([np.diag(b * d), -np.ones((G, 1))])          # b_g d_g k_g - T <= -a_g
    total = np.r_[d, 0.0][None, :]                                 # sum d_g k_g = N
    cons = [LinearConstraint(rows, -np.inf, -a), LinearConstraint(total, batch, batch)]
    bounds = Bounds(np.r_[np.ones(G), 0.0], np.r_[hi, np.inf])
    res = milp(c, constraints=cons, bounds=bounds, integrality=np.r_[np.ones(G), 0])
    if res.status != 0 or res.x is None:
        raise SharesError(
            f"no integral split of the global batch {batch} over groups "
            f"{[m.name for m in models]} with shares multiples of {[m.multiple for m in models]} "
            f"(at most {[int(h * m.multiple) for h, m in zip(hi, models)]}): {res.message}; "
            "use a batch that these multiples can sum to, or other groups")
    # the tie-break: T kept at the optimum, the largest per-device load U >= k_g minimised
    best_t = float(res.x[G])
    # (the same variables and constraints with U appended)
    load = np.hstack([np.eye(G), np.zeros((G, 1)), -np.ones((G, 1))])        # k_g - U <= 0
    cap = np.r_[np.zeros(G), 1.0, 0.0][None, :]                              # T <= T* (1 + 1e-6)
    even = milp(np.r_[np.zeros(G), 0.0, 1.0],
                constraints=[LinearConstraint(np.hstack([rows, np.zeros((G, 1))]), -np.inf, -a),
                             LinearConstraint(np.hstack([total, [[0.0]]]), batch, batch),
                             LinearConstraint(load, -np.inf, 0.0),
                             LinearConstraint(cap, -np.inf, best_t * (1 + 1e-6) + 1e-12)],
                bounds=Bounds(np.r_[np.ones(G), 0.0, 0.0], np.r_[hi, np.inf, np.inf]),
                integrality=np.r_[np.ones(G), 0, 0])
    x = even.x if even.status == 0 and even.x is not None else res.x
    k = np.rint(x[:G]).astype(int)
    shares = tuple(int(x) for x in k * d.astype(int))
    relaxed = milp(c, constraints=cons, bounds=bounds)
    cont = tuple(float(x) for x in relaxed.x[:G] * d) if relaxed.x is not None else tuple(map(float, shares))
    return Shares(shares=shares, step_s=max(m.time(n) for m, n in zip(models, shares)), relaxed=cont)


def _check(models: tuple[GroupModel, ...], batch: int) -> None:
    if not models:
        raise SharesError("solve_shares needs at least one group")
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise SharesError(f"the global batch must be a positive integer, got {batch!r}")
    for m in models:
        if m.multiple < 1:
            raise SharesError(f"group {m.name!r}: share multiple {m.multiple} must be >= 1")
        if not (math.isfinite(m.per_example_s) and m.per_example_s >= 0 and math.isfinite(m.fixed_s)
                and m.fixed_s >= 0):
            raise SharesError(f"group {m.name!r}: time model fixed={m.fixed_s!r} s, per example="
                              f"{m.per_example_s!r} s must be finite and >= 0")
        if m.max_share is not None and m.max_share < m.multiple:
            raise SharesError(f"group {m.name!r}: not even {m.multiple} example(s) (one per device of "
                              f"its data axis) fit in its memory; leave the group out")
    least = sum(m.multiple for m in models)
    if batch < least:
        raise SharesError(
            f"the global batch {batch} is smaller than the {len(models)} groups need: each group takes "
            f"at least one example per device of its data axis ({' + '.join(str(m.multiple) for m in models)}"
            f" = {least}); use a batch of at least {least} or fewer groups")
