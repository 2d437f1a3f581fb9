"""Method "convex" (BAQ closed form): continuous bits by water-filling, rounded, repaired, with a lower bound.

Per tie group g, fit cost(b) ~ a_g + s_g * 2^(-2 b) (s_g >= 0) and each budgeted resource ~ u_gk + v_gk * b
to the allowed choices as the tightest curves lying under every allowed choice's true value. The continuous
problem over b_g in [min bits, max bits] then relaxes the discrete one, so its optimum (the Lagrange dual,
evaluated exactly for every multiplier) is a valid lower bound.
For each multiplier the per-group minimiser is closed form (equal marginal loss):
b_g = clip(-0.5 * log2(w_g / (2 ln2 s_g)), lo_g, hi_g), w_g = sum_k lambda_k v_gk.
One budget: brentq on lambda (water-filling); several: L-BFGS-B on the concave dual.
Rounding, three ways: "ceil", each group's cheapest allowed choice with bits >= b_g; "lagrange", each group's
choice minimising its true cost plus the multipliers times its true resources; "knapsack", the multiple-choice
knapsack over each group's true costs and resources restricted to its choices from one bit level below b_g to
one above, by dynamic programming over the budget (exact when resources lie on a common grid, as bytes do;
beyond CORE groups, the CORE least settled in the Lagrangian are re-chosen and the rest keep the better other
rounding). Real profiles stray from the fitted curve, and ceil/lagrange alone missed the optimum by up to 2.9%
on the demo's. Greedy repair restores feasibility, greedy fill spends leftover slack, and the cheapest plan
is returned (Solution.info: "rounding" names it, the first on ties; "rounding_costs" has every repaired plan's
cost). Pair terms are not modelled; the bound adds their minima.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, minimize

from solvers.greedy import descend, fill
from solvers.problem import Problem, Reduced
from solvers.registry import MethodResult, register_solver

LN2 = np.log(2.0)
CELLS = 2**19  # the rounding knapsack's table size (groups x budget steps): about 15 ms
CORE = 256  # most groups the knapsack re-chooses; the others keep the better other rounding's choice


def under_line(x: np.ndarray, y: np.ndarray, ok: np.ndarray, nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the line a + m x lying under every allowed point (x, y) with the largest sum over those points.

    That LP's optimum passes through two of the points (or is flat), so the candidates are the slopes through
    every pair plus 0; each candidate's intercept is lowered until the line is under all points.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        m = (y[:, :, None] - y[:, None, :]) / (x[:, :, None] - x[:, None, :])
    pair_ok = ok[:, :, None] & ok[:, None, :] & np.isfinite(m) & ((m >= 0) if nonneg else True)
    slopes = np.concatenate([np.where(pair_ok, m, 0.0).reshape(len(x), -1), np.zeros((len(x), 1))], axis=1)
    resid = np.where(ok[:, None, :], y[:, None, :] - slopes[:, :, None] * x[:, None, :], np.inf)
    a = resid.min(axis=2)
    score = ok.sum(axis=1)[:, None] * a + slopes * np.where(ok, x, 0.0).sum(axis=1)[:, None]
    best = np.argmax(score, axis=1)
    rows = np.arange(len(x))
    return a[rows, best], slopes[rows, best]


def _fit(red, bits: np.ndarray, names: list[str]):
    """Per group: cost ~ a + s 2^(-2b), resources ~ u + v b (all under the true values), bit range lo..hi."""
    ok = red.allowed
    a, s = under_line(2.0 ** (-2.0 * bits), red.cost, ok, nonneg=True)
    u = np.zeros((len(ok), len(names)))
    v = np.zeros((len(ok), len(names)))
    for k, name in enumerate(names):
        u[:, k], v[:, k] = under_line(bits, red.tables[name], ok, nonneg=False)
    lo = np.where(ok, bits, np.inf).min(axis=1)
    hi = np.where(ok, bits, -np.inf).max(axis=1)
    return a, s, u, v, lo, hi


def _argmin_bits(s: np.ndarray, w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """argmin over b in [lo, hi] of s 2^(-2b) + w b, elementwise (s >= 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        b = -0.5 * np.log2(w / (2.0 * LN2 * s))
    b = np.where((w > 0) & (s > 0), b, np.where(w > 0, lo, hi))
    return np.clip(b, lo, hi)


def neighbourhood(bits: np.ndarray, allowed: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[G, C] mask: allowed choices from one bit level below b's floor to one level above its ceiling.

    The fitted curve only approximates the true costs, so the discrete optimum may sit a level away from b.
    """
    fl = np.where(allowed & (bits <= b[:, None] + 1e-9), bits, -np.inf).max(axis=1)
    ce = np.where(allowed & (bits >= b[:, None] - 1e-9), bits, np.inf).min(axis=1)
    below = np.where(allowed & (bits < fl[:, None]), bits, -np.inf).max(axis=1)
    above = np.where(allowed & (bits > ce[:, None]), bits, np.inf).min(axis=1)
    lo = np.where(np.isfinite(below), below, fl)
    hi = np.where(np.isfinite(above), above, ce)
    return allowed & (bits >= lo[:, None]) & (bits <= hi[:, None])


def _step(offset: np.ndarray, slack: float, units: int) -> float:
    """The knapsack's budget step: slack / units, or exact when every weight offset is an integer multiple of
    a common step with slack / step <= units (byte counts usually are), so plans that use the budget to the
    byte stay reachable."""
    if slack <= 0:
        return 1.0
    ints = np.round(offset)
    if np.array_equal(offset, ints) and np.abs(ints).max(initial=0) < 2**53:
        step = float(np.gcd.reduce(ints.astype(np.int64)))
        if step > 0 and slack / step <= units:
            return step
    return slack / units


def knapsack(cost: np.ndarray, weight: np.ndarray, ok: np.ndarray, cap: float, anchor: np.ndarray | None = None,
             cells: int = CELLS) -> np.ndarray | None:
    """Cheapest choice per group among `ok` with total weight <= cap, by dynamic programming over the budget.

    Each choice's weight is measured from its group's `anchor` choice (default: the lightest) and rounded UP to
    the budget step (`_step`), so every plan the DP returns meets cap (up to float rounding), the anchor plan is
    reachable when it meets cap, and only groups that leave their anchor lose to the rounding. None when the
    lightest choices exceed cap or the rounding leaves no plan. The table has about `cells` entries (groups
    x budget steps).
    """
    rows = np.arange(len(cost))
    masked = np.where(ok, weight, np.inf)
    if anchor is None:
        anchor = np.argmin(masked, axis=1)
    slack = cap - masked.min(axis=1).sum()
    if not slack >= 0:
        return None
    offset = np.where(ok, weight - weight[rows, anchor][:, None], 0.0)
    step = _step(offset[ok], slack, max(1, cells // max(1, int(np.count_nonzero(ok.sum(axis=1) > 1)))))
    w = np.where(ok, np.ceil(offset / step - 1e-9), np.inf)
    low = w.min(axis=1)
    n = int(np.floor((cap - weight[rows, anchor].sum()) / step + 1e-9) - low.sum())
    if n < 0:
        return None
    w = np.where(ok, w - low[:, None], n + 1).astype(np.int64)
    pick = np.argmin(np.where(w == 0, cost, np.inf), axis=1)
    free = np.flatnonzero(((w > 0) & (w <= n)).any(axis=1))
    f = np.zeros(n + 1)  # f[u]: least cost of the groups so far with total weight <= u steps
    chosen = np.empty((len(free), n + 1), dtype=np.int32)
    for i, g in enumerate(free):
        new = np.full(n + 1, np.inf)
        for c in np.flatnonzero(w[g] <= n):
            k = w[g, c]
            cand = f[:n + 1 - k] + cost[g, c]
            better = cand < new[k:]
            np.copyto(new[k:], cand, where=better)
            np.copyto(chosen[i, k:], c, where=better)
        f = new
    u = n
    for i in range(len(free) - 1, -1, -1):
        pick[free[i]] = chosen[i, u]
        u -= w[free[i], chosen[i, u]]
    return pick


def _round_knapsack(red: Reduced, budgets: dict[str, float], near: np.ndarray, priced: np.ndarray,
                    fold: np.ndarray, ref: np.ndarray, core: int = CORE) -> np.ndarray | None:
    """The restricted knapsack: each group picks among `near` (plus its choice in `ref`).

    One budget (or one with a positive multiplier) is the knapsack's weight as is, several are folded by
    their multipliers (descend repairs the rest). Beyond `core` groups, only the `core` whose cheapest
    switch away from `ref` costs least in the Lagrangian `priced` are free; the others keep `ref`.
    """
    names = list(budgets)
    near = near.copy()
    rows = np.arange(len(ref))
    near[rows, ref] = True
    if np.count_nonzero(fold) == 1:
        k = int(np.flatnonzero(fold)[0])
        weight, cap = red.tables[names[k]], budgets[names[k]]
    else:
        scale = [max(abs(budgets[n]), 1e-12) for n in names]
        weight = sum(fold[k] * red.tables[n] / scale[k] for k, n in enumerate(names))
        cap = sum(fold[k] * budgets[n] / scale[k] for k, n in enumerate(names))
    free = np.flatnonzero(near.sum(axis=1) > 1)
    if len(free) > core:
        switch = np.where(near, priced, np.inf)
        switch[rows, ref] = np.inf
        regret = switch.min(axis=1) - priced[rows, ref]
        free = free[np.argsort(regret[free], kind="stable")[:core]]
    fixed = np.ones(len(ref), dtype=bool)
    fixed[free] = False
    rest = cap - float(weight[fixed, ref[fixed]].sum())
    picked = knapsack(red.cost[free], weight[free], near[free], rest, ref[free])
    if picked is None:
        return None
    out = ref.copy()
    out[free] = picked
    return out


@register_solver("convex")
def solve_convex(problem: Problem, budgets: dict[str, float]) -> MethodResult:
    """Heuristic plan with a proven lower bound (status "feasible"; Solution.gap is rounded vs bound)."""
    if problem.bits is None:
        raise ValueError("method 'convex' needs the bits table (weight bits per layer and choice)")
    red = problem.reduced
    bits = np.zeros(red.cost.shape)
    np.add.at(bits, red.group_of, problem.bits)
    bits /= np.bincount(red.group_of)[:, None]
    names = list(budgets)
    a, s, u, v, lo, hi = _fit(red, bits, names)
    scale = np.array([max(abs(budgets[n]), 1e-12) for n in names])
    u, v = u / scale, v / scale
    caps = np.array([budgets[n] for n in names]) / scale
    cscale = max(float(s.sum()), 1e-30)
    s_n = s / cscale

    def bits_at(lam: np.ndarray) -> np.ndarray:
        return _argmin_bits(s_n, v @ lam, lo, hi)

    def dual(lam: np.ndarray) -> tuple[float, np.ndarray]:
        b = bits_at(lam)
        resid = (u + v * b[:, None]).sum(axis=0) - caps
        return float((s_n * 2.0 ** (-2.0 * b) + (v @ lam) * b).sum() + lam @ (u.sum(axis=0) - caps)), resid

    lam = np.zeros(len(names))
    if len(names) == 1 and dual(lam)[1][0] > 0:
        hi_lam = 1.0
        while dual(np.array([hi_lam]))[1][0] > 0 and hi_lam < 1e12:
            hi_lam *= 2.0
        resid = lambda x: dual(np.array([x]))[1][0]
        lam = np.array([hi_lam if resid(hi_lam) > 0 else brentq(resid, 0.0, hi_lam, xtol=1e-14, rtol=1e-12)])
    elif len(names) > 1:
        res = minimize(lambda x: tuple(-t for t in dual(x)), np.zeros(len(names)), jac=True,
                       method="L-BFGS-B", bounds=[(0, None)] * len(names), options={"maxiter": 200, "maxfun": 1000})
        lam = res.x
    bound = dual(lam)[0] * cscale + a.sum()
    bound += sum(float(np.min(d[np.ix_(red.allowed[g], red.allowed[h])])) for (g, h), d in red.pairs.items())

    b_cont = bits_at(lam)
    above = red.allowed & (bits >= b_cont[:, None] - 1e-9)
    key = np.where(above, bits, np.inf)
    ceil_bits = key.min(axis=1)
    ceil = np.argmin(np.where(above & (bits == ceil_bits[:, None]), red.cost, np.inf), axis=1)
    priced = red.cost / cscale + sum(lam[k] * red.tables[n] / scale[k] for k, n in enumerate(names))
    lagrange = np.argmin(np.where(red.allowed, priced, np.inf), axis=1)

    def repaired(start: np.ndarray | None) -> np.ndarray | None:
        """start made feasible by greedy descent, then its slack spent by greedy fill; None when stuck."""
        cur = None if start is None else descend(red, budgets, start)
        return None if cur is None else fill(red, budgets, cur)

    plans = {how: repaired(start) for how, start in (("ceil", ceil), ("lagrange", lagrange))}
    plans = {how: p for how, p in plans.items() if p is not None}
    costs = {how: problem.objective(red.expand(p)) for how, p in plans.items()}
    if names:
        ref = plans[min(costs, key=costs.get)] if plans else lagrange
        near = neighbourhood(bits, red.allowed, b_cont)
        near[np.arange(len(near)), lagrange] = True
        fold = lam if lam.max() > 0 else np.ones(len(names))
        knap = repaired(_round_knapsack(red, budgets, near, priced, fold, ref))
        if knap is not None:
            plans["knapsack"], costs["knapsack"] = knap, problem.objective(red.expand(knap))
    if not plans:
        return MethodResult(None, "failed")
    won = min(costs, key=costs.get)
    return MethodResult(red.expand(plans[won]), "feasible", bound, {
        "continuous_bits": b_cont[red.group_of].tolist(), "multipliers": dict(zip(names, lam.tolist())),
        "rounding": won, "rounding_costs": costs})
