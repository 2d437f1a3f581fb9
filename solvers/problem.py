"""The allocation problem: one choice per layer, costs and resource tables, ties, pins, pair terms.

Everything is validated in the constructor so that solvers can trust the arrays.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
import numpy as np

from solvers.jsonio import atomic_write_json

QUANTITIES = ("memory", "latency", "bops")
BUDGETS = QUANTITIES + ("avg_bits",)


def latency_at_name(tokens: int) -> str:
    """The budget name of the latency table at `tokens` tokens per forward (`Problem.latency_at`)."""
    return f"latency@{tokens}"


def _tokens(x: Any) -> int:
    """A token count key of `latency_at` (JSON gives it as a decimal string)."""
    t = int(x) if isinstance(x, str) and x.isdigit() else x
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"latency_at keys must be positive token counts; got {x!r}")
    return int(t)


def _label(x: Any, what: str) -> str:
    if isinstance(x, bool) or not isinstance(x, (str, int, np.integer)):
        raise TypeError(f"{what} must be a string label (or an int, used as its decimal string); got {x!r}")
    return str(x)


def _table(name: str, value: Any, layers: list[str], choices: list[str]) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    shape = (len(layers), len(choices))
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape [layers, choices] = {shape}; got {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        i, c = bad[0]
        raise ValueError(
            f"{name}[layer {layers[i]!r}, choice {choices[c]!r}] is {arr[i, c]}; every entry must be finite "
            f"({len(bad)} non-finite entries; mark unavailable choices with allowed=False and give any finite value)"
        )
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Reduced:
    """The problem over tie groups: each group is one super-layer whose tables are its members' sums.

    Pins and `allowed` become the group's allowed mask; pair terms between members of one group become
    part of the group's cost, pair terms between groups are summed per (g, h) with g < h.
    """

    groups: list[np.ndarray]
    group_of: np.ndarray
    cost: np.ndarray
    tables: dict[str, np.ndarray]
    allowed: np.ndarray
    pairs: dict[tuple[int, int], np.ndarray]

    def expand(self, gindex: np.ndarray) -> np.ndarray:
        """Layer choice indices from group choice indices."""
        return np.asarray(gindex, dtype=np.int64)[self.group_of]


class Problem:
    """Choose one of `choices` per layer, minimising total cost (plus pair terms) under budgets.

    latency: one [layers, choices] latency table (budget "latency"); latency_at: {tokens: table}, one per token
    count per forward (budgets "latency@<tokens>"), so that a plan can be bounded at decode and prefill at once.
    """

    def __init__(
        self,
        layers: Iterable[str],
        choices: Iterable[str],
        cost: Any,
        memory: Any = None,
        latency: Any = None,
        bops: Any = None,
        bits: Any = None,
        params: Any = None,
        ties: Iterable[Iterable[str]] = (),
        pins: Mapping[str, str] | None = None,
        pairs: Mapping[tuple[str, str], Any] | None = None,
        allowed: Any = None,
        latency_at: Mapping[int, Any] | None = None,
    ) -> None:
        self.layers = list(layers)
        for x in self.layers:
            if not isinstance(x, str):
                raise TypeError(f"layer names must be strings; got {x!r}")
        self.choices = [_label(c, "each choice") for c in choices]
        if not self.layers:
            raise ValueError("layers is empty; give at least one layer name")
        if not self.choices:
            raise ValueError("choices is empty; give at least one choice label")
        for what, names in (("layers", self.layers), ("choices", self.choices)):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"{what} contains {n!r} twice; names must be unique")
                seen.add(n)
        self._li = {n: i for i, n in enumerate(self.layers)}
        self._ci = {c: j for j, c in enumerate(self.choices)}
        L, C = len(self.layers), len(self.choices)

        self.cost = _table("cost", cost, self.layers, self.choices)
        self.memory = None if memory is None else _table("memory", memory, self.layers, self.choices)
        self.latency = None if latency is None else _table("latency", latency, self.layers, self.choices)
        self.latency_at = {}
        for key, table in sorted(((_tokens(k), v) for k, v in (latency_at or {}).items()), key=lambda kv: kv[0]):
            if key in self.latency_at:
                raise ValueError(f"latency_at has token count {key} twice")
            self.latency_at[key] = _table(latency_at_name(key), table, self.layers, self.choices)
        self.bops = None if bops is None else _table("bops", bops, self.layers, self.choices)
        self.bits = None if bits is None else _table("bits", bits, self.layers, self.choices)
        self.params = None
        if params is not None:
            p = np.array(params, dtype=np.float64)
            if p.shape != (L,):
                raise ValueError(f"params must have shape [layers] = ({L},); got {p.shape}")
            if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
                raise ValueError("params must be finite, non-negative parameter counts with a positive sum")
            p.setflags(write=False)
            self.params = p

        if allowed is None:
            mask = np.ones((L, C), dtype=bool)
        else:
            mask = np.array(allowed)
            if mask.shape != (L, C) or mask.dtype != bool:
                raise ValueError(f"allowed must be a bool array of shape [layers, choices] = {(L, C)}; "
                                 f"got dtype {mask.dtype}, shape {mask.shape}")
            mask = mask.copy()
        for i in np.flatnonzero(~mask.any(axis=1)):
            raise ValueError(f"allowed marks no choice available for layer {self.layers[i]!r}")
        mask.setflags(write=False)
        self.allowed = mask

        self.ties = [self._tie_group(g) for g in ties]
        self.pins = {}
        for name, label in (pins or {}).items():
            i = self._layer_index(name, "pins")
            lab = _label(label, f"pin for layer {name!r}")
            if lab not in self._ci:
                raise ValueError(f"pin {name!r} -> {lab!r}: unknown choice; allowed values: {self.choices}")
            if not mask[i, self._ci[lab]]:
                raise ValueError(f"pin {name!r} -> {lab!r} conflicts with allowed: that choice is not allowed "
                                 f"for this layer (allowed: {[c for c, a in zip(self.choices, mask[i]) if a]})")
            self.pins[name] = lab

        self.pairs = {}
        for key, d in (pairs or {}).items():
            if not isinstance(key, tuple) or len(key) != 2:
                raise ValueError(f"pairs keys must be (layer_a, layer_b) tuples; got {key!r}")
            a, b = (self.layers[self._layer_index(n, "pairs")] for n in key)
            if a == b:
                raise ValueError(f"pairs key {key!r} pairs a layer with itself; put its cost in `cost` instead")
            if (a, b) in self.pairs or (b, a) in self.pairs:
                raise ValueError(f"pairs has the layer pair {key!r} twice (in some order); give one [C, C] array")
            arr = np.array(d, dtype=np.float64)
            if arr.shape != (C, C):
                raise ValueError(f"pairs[{key!r}] must have shape [choices, choices] = {(C, C)}; got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                x, y = np.argwhere(~np.isfinite(arr))[0]
                raise ValueError(f"pairs[{key!r}][{self.choices[x]!r}, {self.choices[y]!r}] is {arr[x, y]}; "
                                 "pair terms must be finite")
            arr.setflags(write=False)
            self.pairs[(a, b)] = arr
        _ = self.reduced  # builds the tie groups now, so conflicts between ties, pins and allowed raise here

    def _layer_index(self, name: Any, where: str) -> int:
        if name not in self._li:
            raise ValueError(f"{where} names unknown layer {name!r}; known layers: {_preview(self.layers)}")
        return self._li[name]

    def _tie_group(self, group: Iterable[str]) -> tuple[str, ...]:
        if isinstance(group, str):
            raise ValueError(f"each tie must be a group of layer names like ('a', 'b'); got the string {group!r}")
        names = tuple(group)
        for n in names:
            self._layer_index(n, "ties")
        return names

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_choices(self) -> int:
        return len(self.choices)

    @cached_property
    def tables(self) -> dict[str, np.ndarray]:
        """Resource tables by budget name; avg_bits is params * bits / sum(params) so that it sums."""
        out = {q: getattr(self, q) for q in QUANTITIES if getattr(self, q) is not None}
        out.update({latency_at_name(t): table for t, table in self.latency_at.items()})
        if self.bits is not None and self.params is not None:
            out["avg_bits"] = self.bits * (self.params / self.params.sum())[:, None]
        return out

    @cached_property
    def reduced(self) -> Reduced:
        L, C = self.n_layers, self.n_choices
        g = nx.Graph()
        g.add_nodes_from(range(L))
        for names in self.ties:
            idx = [self._li[n] for n in names]
            g.add_edges_from(zip(idx, idx[1:]))
        groups = sorted((np.array(sorted(c)) for c in nx.connected_components(g)), key=lambda a: a[0])
        group_of = np.empty(L, dtype=np.int64)
        for k, members in enumerate(groups):
            group_of[members] = k
        G = len(groups)
        allowed = np.ones((G, C), dtype=bool)
        np.logical_and.at(allowed, group_of, self.allowed)
        pinned: dict[int, str] = {}
        for name, lab in self.pins.items():
            k = group_of[self._li[name]]
            if k in pinned and pinned[k] != lab:
                other = next(n for n, v in self.pins.items() if group_of[self._li[n]] == k and v != lab)
                raise ValueError(f"pins conflict with ties: {name!r} -> {lab!r} but tied layer {other!r} -> "
                                 f"{self.pins[other]!r}")
            pinned[k] = lab
            keep = np.zeros(C, dtype=bool)
            keep[self._ci[lab]] = True
            allowed[k] &= keep
        for k in np.flatnonzero(~allowed.any(axis=1)):
            names = [self.layers[i] for i in groups[k]]
            why = f" and pin {pinned[k]!r}" if k in pinned else ""
            raise ValueError(f"tied layers {names} have no common allowed choice (allowed mask{why} conflict)")

        def group_sum(t: np.ndarray) -> np.ndarray:
            out = np.zeros((G, C))
            np.add.at(out, group_of, t)
            return out

        cost = group_sum(self.cost)
        gpairs: dict[tuple[int, int], np.ndarray] = {}
        for (a, b), d in self.pairs.items():
            ga, gb = group_of[self._li[a]], group_of[self._li[b]]
            if ga == gb:
                cost[ga] += np.diag(d)
            elif ga < gb:
                gpairs[(ga, gb)] = gpairs.get((ga, gb), 0) + d
            else:
                gpairs[(gb, ga)] = gpairs.get((gb, ga), 0) + d.T
        return Reduced(groups, group_of, cost, {q: group_sum(t) for q, t in self.tables.items()}, allowed, gpairs)

    def objective(self, index: np.ndarray) -> float:
        """Total cost of a plan given as layer choice indices, pair terms included."""
        index = np.asarray(index)
        total = float(self.cost[np.arange(self.n_layers), index].sum())
        for (a, b), d in self.pairs.items():
            total += float(d[index[self._li[a]], index[self._li[b]]])
        return total

    def totals(self, index: np.ndarray) -> dict[str, float]:
        """Total of every resource table for a plan (avg_bits when bits and params are given)."""
        rows = np.arange(self.n_layers)
        return {q: float(t[rows, np.asarray(index)].sum()) for q, t in self.tables.items()}

    def is_valid(self, index: np.ndarray) -> bool:
        """True when the plan respects allowed, pins and ties."""
        index = np.asarray(index)
        if not self.allowed[np.arange(self.n_layers), index].all():
            return False
        if any(self.choices[index[self._li[n]]] != lab for n, lab in self.pins.items()):
            return False
        return all(len({int(index[self._li[n]]) for n in names}) == 1 for names in self.ties)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": self.layers, "choices": self.choices, "cost": self.cost.tolist()}
        for q in ("memory", "latency", "bops", "bits"):
            if getattr(self, q) is not None:
                d[q] = getattr(self, q).tolist()
        if self.latency_at:
            d["latency_at"] = {str(t): table.tolist() for t, table in self.latency_at.items()}
        if self.params is not None:
            d["params"] = self.params.tolist()
        if self.ties:
            d["ties"] = [list(t) for t in self.ties]
        if self.pins:
            d["pins"] = dict(self.pins)
        if self.pairs:
            d["pairs"] = [{"a": a, "b": b, "table": t.tolist()} for (a, b), t in self.pairs.items()]
        if not self.allowed.all():
            d["allowed"] = self.allowed.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Problem":
        known = {"layers", "choices", "cost", "memory", "latency", "latency_at", "bops", "bits", "params", "ties", "pins",
                 "pairs", "allowed"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown Problem fields {sorted(extra)}; allowed fields: {sorted(known)}")
        kw = dict(d)
        if "pairs" in kw:
            kw["pairs"] = {(p["a"], p["b"]): p["table"] for p in kw["pairs"]}
        if "allowed" in kw:
            kw["allowed"] = np.array(kw["allowed"], dtype=bool)
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Problem":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return (f"Problem({self.n_layers} layers x {self.n_choices} choices, tables={list(self.tables)}, "
                f"ties={len(self.ties)}, pins={len(self.pins)}, pairs={len(self.pairs)})")


def _preview(names: list[str], n: int = 5) -> str:
    head = ", ".join(repr(x) for x in names[:n])
    return f"[{head}{', ...' if len(names) > n else ''}] ({len(names)} in all)"
