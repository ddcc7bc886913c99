"""scripts/quality.py's verdicts: a recipe meets a class target only if every digits classifier says so."""

from __future__ import annotations

import pytest

from scripts import quality


def passing_metrics() -> dict[str, float]:
    metrics = {"border_artifacts": 0.01}
    for c in ("digits_cnn", "digits_mlp"):
        metrics |= {f"classes_covered_{c}": 10.0, f"class_kl_{c}": 0.01, f"class_confidence_{c}": 0.95,
                    f"recall_{c}": 0.8, f"rejected_{c}": 0.06}
    return metrics


@pytest.mark.parametrize("targets", [quality.digits_targets(0.05), quality.gan_targets()], ids=["digits", "gan"])
def test_a_recipe_that_fools_one_classifier_fails(targets):
    verdicts, met = quality.check_targets(targets, passing_metrics())
    assert met and len(verdicts) == len(targets)
    for c in ("digits_cnn", "digits_mlp"):
        fooled_one = passing_metrics() | {f"class_confidence_{c}": 0.70}  # the other still says 0.95
        verdicts, met = quality.check_targets(targets, fooled_one)
        assert not met
        assert [v["rule"] for v in verdicts if not v["met"]] == [f"class_confidence_{c} >= 0.9"]
    missing = {k: v for k, v in passing_metrics().items() if "digits_mlp" not in k}  # a classifier not run
    assert not quality.check_targets(targets, missing)[1]


def test_gan_targets_include_variety_and_artifacts():
    rules = [t.metric for t in quality.gan_targets()]
    assert {"recall_digits_cnn", "recall_digits_mlp", "border_artifacts", "rejected_digits_cnn",
            "rejected_digits_mlp"} <= set(rules)
    for key, bad in (("border_artifacts", 0.3), ("recall_digits_mlp", 0.5), ("rejected_digits_cnn", 0.2)):
        assert not quality.check_targets(quality.gan_targets(), passing_metrics() | {key: bad})[1]


def test_gan_ablation_adopts_only_finished_runs_of_the_same_overrides(tmp_path):
    import json

    import yaml

    from scripts import gan_ablation
    run = tmp_path / "base"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment@_global_=gan_digits", "a=1"]))
    (run / "status.json").write_text(json.dumps({"status": "finished"}))
    assert gan_ablation.adoptable(run, ["a=1", "experiment=gan_digits"])  # order and the experiment spelling aside
    assert not gan_ablation.adoptable(run, ["experiment=gan_digits", "a=2"])
    assert not gan_ablation.adoptable(run, ["experiment=gan_digits"])
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    assert not gan_ablation.adoptable(run, ["a=1", "experiment=gan_digits"])
