"""Method "greedy" (MPTQ-ViT style): from the cheapest-cost plan, step down the layer whose move costs least
per unit of budget violation removed until every budget holds, then spend leftover slack on the move that
lowers cost most. A baseline, and the repair step of "convex". Works on tie groups; pair terms are counted.
"""
from __future__ import annotations

import numpy as np

from solvers.problem import Problem, Reduced
from solvers.registry import MethodResult, register_solver, within


class _Pairs:
    """Pair terms stacked for vectorised 'cost of switching group g to choice c given the others'."""

    def __init__(self, red: Reduced) -> None:
        keys = list(red.pairs)
        self.g = np.array([k[0] for k in keys], dtype=np.int64)
        self.h = np.array([k[1] for k in keys], dtype=np.int64)
        self.d = np.stack([red.pairs[k] for k in keys]) if keys else np.zeros((0, 1, 1))

    def unary(self, base: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """base [G, C] plus each group's pair cost per choice with the other groups at `cur`."""
        out = base.copy()
        if len(self.g):
            e = np.arange(len(self.g))
            np.add.at(out, self.g, self.d[e, :, cur[self.h]])
            np.add.at(out, self.h, self.d[e, cur[self.g], :])
        return out


class _State:
    """Current plan with per-move deltas kept up to date incrementally (only the moved row changes)."""

    def __init__(self, red: Reduced, budgets: dict[str, float], cur: np.ndarray) -> None:
        self.red, self.pairs, self.cur = red, _Pairs(red), cur.copy()
        self.rows = np.arange(len(cur))
        self.tabs = [red.tables[b] for b in budgets]
        self.caps = list(budgets.values())
        self.delta = [t - t[self.rows, self.cur][:, None] for t in self.tabs]
        self.totals = [float(t[self.rows, self.cur].sum()) for t in self.tabs]
        self._dc = None if len(self.pairs.g) else red.cost - red.cost[self.rows, self.cur][:, None]

    def dcost(self) -> np.ndarray:
        """[G, C] change of total cost (pair terms included) when group g switches to choice c."""
        if self._dc is not None:
            return self._dc
        u = self.pairs.unary(self.red.cost, self.cur)
        return u - u[self.rows, self.cur][:, None]

    def move(self, g: int, c: int) -> None:
        for k, t in enumerate(self.tabs):
            self.totals[k] += self.delta[k][g, c]
            self.delta[k][g] = t[g] - t[g, c]
        if self._dc is not None:
            self._dc[g] = self.red.cost[g] - self.red.cost[g, c]
        self.cur[g] = c


def descend(red: Reduced, budgets: dict[str, float], cur: np.ndarray) -> np.ndarray | None:
    """Lower choices greedily until all budgets hold; None when stuck."""
    st = _State(red, budgets, cur)
    caps = [c + 1e-7 * max(1.0, abs(c)) for c in st.caps]
    scale = [max(abs(c), 1e-12) for c in st.caps]
    while True:
        v = sum(max(t - c, 0.0) / s for t, c, s in zip(st.totals, caps, scale))
        if v <= 0:
            return st.cur
        dv = sum(np.maximum(t + d - c, 0.0) / s for t, d, c, s in zip(st.totals, st.delta, caps, scale)) - v
        gain = dv < -1e-12  # strict, so float noise cannot make two moves undo each other forever
        ratio = np.where(red.allowed & gain, st.dcost() / np.where(gain, -dv, 1.0), np.inf)
        g, c = np.unravel_index(np.argmin(ratio), ratio.shape)
        if not np.isfinite(ratio[g, c]):
            return None
        st.move(g, c)


def fill(red: Reduced, budgets: dict[str, float], cur: np.ndarray) -> np.ndarray:
    """Apply the move that lowers cost most while all budgets keep holding, until none does."""
    st = _State(red, budgets, cur)
    while True:
        ok = red.allowed.copy()
        for t, d, c in zip(st.totals, st.delta, st.caps):
            ok &= within(t + d, c)
        dc = np.where(ok, st.dcost(), np.inf)
        g, c = np.unravel_index(np.argmin(dc), dc.shape)
        if not dc[g, c] < -1e-12 * max(1.0, abs(float(red.cost[g, st.cur[g]]))):
            return st.cur
        st.move(g, c)


def greedy_plan(red: Reduced, budgets: dict[str, float]) -> np.ndarray | None:
    """The greedy plan over tie groups (descend from the cheapest plan, then fill), or None when stuck."""
    start = np.argmin(np.where(red.allowed, red.cost, np.inf), axis=1)
    cur = descend(red, budgets, start)
    return None if cur is None else fill(red, budgets, cur)


@register_solver("greedy")
def solve_greedy(problem: Problem, budgets: dict[str, float]) -> MethodResult:
    """Heuristic: feasible when it returns, no optimality claim (status "feasible")."""
    plan = greedy_plan(problem.reduced, budgets)
    if plan is None:
        return MethodResult(None, "failed")
    return MethodResult(problem.reduced.expand(plan), "feasible")
