"""Which evaluation is the best so far, and when to stop waiting for a better one."""

from __future__ import annotations

from typing import Mapping

#: Which way each metric of `genlab eval` improves, by its name before `_<extractor>` (fid_digits_cnn,
#: class_kl_digits_mlp) and `@<variant>` (precision@trunc0.5). Adding a metric adds its row here.
EVAL_METRICS: dict[str, str] = {
    "fid": "lower", "kid": "lower", "kid_std": "lower", "class_kl": "lower", "nll_iwae": "lower",
    "recon_mse": "lower", "border_artifacts": "lower", "rejected": "lower", "seconds": "lower",
    "seconds_per_image": "lower",
    "precision": "higher", "recall": "higher", "class_confidence": "higher", "classes_covered": "higher",
    "class_agreement": "higher", "anomaly_auroc": "higher", "elbo": "higher", "colour_accuracy": "higher",
    "disc_iou": "higher", "edge_f1": "higher", "val_accuracy": "higher",
}


def declared_directions(family: object) -> dict[str, str]:
    """What a family class (or instance) declares: its `losses` lower is better, its `metrics` as stated."""
    return {**{k: "lower" for k in getattr(family, "losses", ())}, **dict(getattr(family, "metrics", {}))}


def direction(metric: str, declared: Mapping[str, str] | None = None) -> str:
    """"lower" or "higher": as `declared` (a family's, see `declared_directions`) says, else as EVAL_METRICS does.

    A name neither knows is a logged scalar of a family that did not declare it: lower is better when its name
    ends in "loss" or "error" (what losses are called), else higher.
    """
    declared = declared or {}
    name = metric.removeprefix("best_").split("@", 1)[0]
    if metric in declared or name in declared:
        return declared.get(metric) or declared[name]
    base = max((k for k in EVAL_METRICS if name == k or name.startswith(k + "_")), key=len, default=None)
    if base is not None:
        return EVAL_METRICS[base]
    return "lower" if name.endswith(("loss", "error")) else "higher"


def lower_is_better(metric: str, declared: Mapping[str, str] | None = None) -> bool:
    return direction(metric, declared) == "lower"


class BestTracker:
    """Follows one metric over evaluations; says when it improved and when patience ran out.

    Args:
        metric: the metric name, or "auto" (the first `fid_*` metric seen, else the first metric).
        patience: evaluations without improvement before `should_stop` (0 = never).
        declared: directions the family declares (`declared_directions(family)`), before EVAL_METRICS'.
    """

    def __init__(self, metric: str = "auto", patience: int = 0, declared: Mapping[str, str] | None = None):
        self.metric, self.patience, self.declared = metric, patience, dict(declared or {})
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True if it is the new best."""
        if self.metric == "auto":
            self.metric = next((k for k in metrics if k.startswith("fid_")), next(iter(metrics)))
        value = metrics[self.metric]
        lower = lower_is_better(self.metric, self.declared)
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
