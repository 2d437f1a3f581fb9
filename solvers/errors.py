"""Errors raised by the solvers."""
from __future__ import annotations


class InfeasibleError(ValueError):
    """No plan meets the budgets; `.smallest` maps each given budget to its smallest achievable value."""

    def __init__(self, message: str, smallest: dict[str, float]) -> None:
        super().__init__(message)
        self.smallest = smallest


class TargetNotMetError(ValueError):
    """Not even the best plan on the frontier meets the quality target; `.log` holds the evaluations."""

    def __init__(self, message: str, log: list[dict]) -> None:
        super().__init__(message)
        self.log = log
