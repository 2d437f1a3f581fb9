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


def _violation(totals: np.ndarray, caps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.maximum(totals - caps, 0.0) / scale).sum(axis=-1)


def _move_totals(tabs: np.ndarray, cur: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """[G, C, B] budget totals after switching group g to choice c."""
    rows = np.arange(len(cur))
    return totals + tabs - tabs[rows, cur][:, None, :]


def descend(red: Reduced, budgets: dict[str, float], cur: np.ndarray) -> np.ndarray | None:
    """Lower choices greedily until all budgets hold; None when stuck."""
    if not budgets:
        return cur
    pairs = _Pairs(red)
    tabs = np.stack([red.tables[b] for b in budgets], axis=-1)
    caps = np.array(list(budgets.values()))
    scale = np.maximum(np.abs(caps), 1e-12)
    tol = 1e-7 * np.maximum(1.0, np.abs(caps))
    rows = np.arange(len(cur))
    cur = cur.copy()
    while True:
        totals = tabs[rows, cur].sum(axis=0)
        v = _violation(totals, caps + tol, scale)
        if v <= 0:
            return cur
        dv = _violation(_move_totals(tabs, cur, totals), caps + tol, scale) - v
        u = pairs.unary(red.cost, cur)
        dc = u - u[rows, cur][:, None]
        gain = dv < -1e-12  # strict, so float noise cannot make two moves undo each other forever
        ratio = np.where(red.allowed & gain, dc / np.where(gain, -dv, 1.0), np.inf)
        g, c = np.unravel_index(np.argmin(ratio), ratio.shape)
        if not np.isfinite(ratio[g, c]):
            return None
        cur[g] = c


def fill(red: Reduced, budgets: dict[str, float], cur: np.ndarray) -> np.ndarray:
    """Apply the move that lowers cost most while all budgets keep holding, until none does."""
    pairs = _Pairs(red)
    names = list(budgets)
    tabs = np.stack([red.tables[b] for b in names], axis=-1) if names else np.zeros(red.cost.shape + (0,))
    rows = np.arange(len(cur))
    cur = cur.copy()
    while True:
        totals = tabs[rows, cur].sum(axis=0)
        ok = red.allowed.copy()
        for k, b in enumerate(names):
            ok &= within(_move_totals(tabs[..., k:k + 1], cur, totals[k:k + 1])[..., 0], budgets[b])
        u = pairs.unary(red.cost, cur)
        dc = np.where(ok, u - u[rows, cur][:, None], np.inf)
        g, c = np.unravel_index(np.argmin(dc), dc.shape)
        if not dc[g, c] < -1e-12 * max(1.0, abs(u[g, cur[g]])):
            return cur
        cur[g] = c


@register_solver("greedy")
def solve_greedy(problem: Problem, budgets: dict[str, float]) -> MethodResult:
    """Heuristic: feasible when it returns, no optimality claim (status "feasible")."""
    red = problem.reduced
    start = np.argmin(np.where(red.allowed, red.cost, np.inf), axis=1)
    cur = descend(red, budgets, start)
    if cur is None:
        return MethodResult(None, "failed")
    return MethodResult(red.expand(fill(red, budgets, cur)), "feasible")
