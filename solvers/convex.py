"""Method "convex" (BAQ closed form): continuous bits by water-filling, rounded, repaired, with a lower bound.

Per tie group g, fit cost(b) ~ a_g + s_g * 2^(-2 b) (s_g >= 0) and each budgeted resource ~ u_gk + v_gk * b
to the allowed choices as the tightest curves lying under every allowed choice's true value. The continuous problem over b_g in [min bits, max bits] then relaxes the discrete
one, so its optimum (the Lagrange dual, evaluated exactly for every multiplier) is a valid lower bound.
For each multiplier the per-group minimiser is closed form (equal marginal loss):
b_g = clip(-0.5 * log2(w_g / (2 ln2 s_g)), lo_g, hi_g), w_g = sum_k lambda_k v_gk.
One budget: brentq on lambda (water-filling); several: L-BFGS-B on the concave dual.
Rounding, two ways: each group's cheapest allowed choice with bits >= b_g, and each group's choice minimising
its true cost plus the multipliers times its true resources; greedy repair restores feasibility, greedy fill
spends leftover slack, and the cheaper of the two plans is returned. Pair terms are not modelled; the bound adds their minima.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, minimize

from solvers.greedy import descend, fill
from solvers.problem import Problem
from solvers.registry import MethodResult, register_solver

LN2 = np.log(2.0)


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
    repaired = (descend(red, budgets, start) for start in (ceil, lagrange))
    plans = [fill(red, budgets, p) for p in repaired if p is not None]
    if not plans:
        return MethodResult(None, "failed")
    cur = min(plans, key=lambda p: problem.objective(red.expand(p)))
    return MethodResult(red.expand(cur), "feasible", bound, {"continuous_bits": b_cont[red.group_of].tolist(),
                                                             "multipliers": dict(zip(names, lam.tolist()))})
