"""Which evaluation is the best so far, and when to stop waiting for a better one."""

from __future__ import annotations

from typing import Iterable, Mapping

from genlab.families.logged import lower_is_better


class BestTracker:
    """Follows one metric over evaluations; says when it improved and when patience ran out.

    Args:
        metric: the metric name, or "auto" (the first `fid_*` metric seen, else the first metric).
        patience: evaluations without improvement before `should_stop` (0 = never).
        declared: the family's `metrics` and their directions; losses: its `losses` (lower is better).
            Both before genlab eval's own (see `families.logged.direction`).
    """

    def __init__(self, metric: str = "auto", patience: int = 0, declared: Mapping[str, str] | None = None,
                 losses: Iterable[str] = ()):
        self.metric, self.patience, self.declared, self.losses = metric, patience, dict(declared or {}), tuple(losses)
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True if it is the new best."""
        if self.metric == "auto":
            self.metric = next((k for k in metrics if k.startswith("fid_")), next(iter(metrics)))
        value = metrics[self.metric]
        lower = lower_is_better(self.metric, self.declared, self.losses)
        better = self.best is None or (value < self.best if lower else value > self.best)
        if better:
            self.best, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_since_best >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict) -> None:
        self.metric, self.best = state["metric"], state["best"]
        self.best_step, self.evals_since_best = state["best_step"], state["evals_since_best"]
