"""Which logged scalars are losses, and which way a metric improves: as the family declares them.

A family declares its `losses` and its `metrics` with their directions (families.contract); the
training summary, the model card, `genlab runs`, reports and the best-checkpoint tracker all ask
these two functions, so that "is this a loss?" has one answer. Each has one fallback, for a
family that declares nothing (an old or outside family): a logged key with "loss" in its name is
a loss, and `genlab eval`'s own metrics improve as EVAL_METRICS says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # contract.py imports torch; `genlab runs` reads these without it
    from genlab.families.contract import Direction

#: Which way each metric of `genlab eval` improves, by its name before `_<extractor>` (fid_digits_cnn,
#: class_kl_digits_mlp) and `@<variant>` (precision@trunc0.5). Adding a metric adds its row here.
EVAL_METRICS: dict[str, Direction] = {
    "fid": "lower", "kid": "lower", "kid_std": "lower", "class_kl": "lower", "nll_iwae": "lower",
    "recon_mse": "lower", "border_artifacts": "lower", "rejected": "lower", "seconds": "lower",
    "seconds_per_image": "lower",
    "precision": "higher", "recall": "higher", "class_confidence": "higher", "classes_covered": "higher",
    "class_agreement": "higher", "anomaly_auroc": "higher", "elbo": "higher", "colour_accuracy": "higher",
    "disc_iou": "higher", "edge_f1": "higher", "val_accuracy": "higher",
}


def losses(declared_losses: Iterable[str] | None, logged_keys: Iterable[str]) -> tuple[str, ...]:
    """The losses among a run's logged scalars.

    Args:
        declared_losses: the family's `losses` (class attribute, or `families.declarations.declared`'s).
        logged_keys: the keys the run logged (a summary, or every row of metrics.jsonl).

    Returns:
        The declared losses; only when the family declares none, every logged key with "loss" in its
        name, in the order first logged.
    """
    declared = tuple(declared_losses or ())
    return declared or tuple(dict.fromkeys(k for k in logged_keys if "loss" in k))


def direction(metric: str, declared_metrics: Mapping[str, Direction] | None = None,
              declared_losses: Iterable[str] | None = None) -> Direction:
    """"lower" or "higher": as the family declares (`metrics`, and its `losses` are lower), else EVAL_METRICS.

    A `best_` prefix (genlab runs' best evaluation) and an `@<variant>` suffix are read through. A name
    neither declared nor one of genlab eval's is higher-is-better, unless it is a loss by `losses`'s
    fallback (the family declares no losses and the name has "loss" in it).
    """
    declared = dict(declared_metrics or {})
    name = metric.removeprefix("best_").split("@", 1)[0]
    if metric in declared or name in declared:
        return declared.get(metric) or declared[name]
    if name in losses(declared_losses, [name]):
        return "lower"
    base = max((k for k in EVAL_METRICS if name == k or name.startswith(k + "_")), key=len, default=None)
    return EVAL_METRICS[base] if base is not None else "higher"


def lower_is_better(metric: str, declared_metrics: Mapping[str, Direction] | None = None,
                    declared_losses: Iterable[str] | None = None) -> bool:
    """Does `metric` improve downwards? (see `direction`)."""
    return direction(metric, declared_metrics, declared_losses) == "lower"
