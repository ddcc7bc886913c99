"""scripts/budget_compare.py's rules: a budget is met on both classifiers or not at all; the table of docs/evaluation.md."""

from __future__ import annotations

import json

from scripts import budget_compare


def _row(steps: int, **changes: float) -> dict[str, float]:
    row = {"steps": steps, "fid_digits_cnn": 0.5}
    for c in budget_compare.CLASSIFIERS:
        row.update({f"classes_covered_{c}": 10.0, f"class_kl_{c}": 0.01, f"class_confidence_{c}": 0.95})
    row.update(changes)
    return row


def test_targets_hold_only_when_both_classifiers_meet_every_one():
    assert budget_compare.meets_targets(_row(8))
    assert not budget_compare.meets_targets(_row(8, class_confidence_digits_mlp=0.89))  # one classifier fails
    assert not budget_compare.meets_targets(_row(8, class_kl_digits_cnn=0.06))
    assert not budget_compare.meets_targets(_row(8, classes_covered_digits_cnn=9.0))
    assert budget_compare.meets_targets(_row(8, class_confidence_digits_cnn=0.9, class_kl_digits_mlp=0.05))  # bounds


def test_table_has_a_row_per_run_in_arm_and_budget_order(tmp_path):
    rows = [{**_row(s), "targets_met": s > 1} for s in budget_compare.SAMPLING_STEPS]
    runs = {f"{arm}@{m}min": {"sampler": "euler", "budget_minutes": m, "steps": 100 * m, "rows": rows}
            for arm in reversed(list(budget_compare.ARMS)) for m in (8, 3)}
    out = tmp_path / "budget.json"
    out.write_text(json.dumps({"runs": runs}))
    lines = budget_compare.table(out).splitlines()
    assert len(lines) == 2 + len(runs)
    assert [line.split("|")[1].split()[0] for line in lines[2:]] == [a for a in budget_compare.ARMS for _ in (3, 8)]
    assert "3 min (300)" in lines[2] and "8 min (800)" in lines[3]
    cells = lines[2].split("|")[3:-1]
    assert cells[0].strip().startswith("0.50 ") and cells[1].strip().startswith("**0.50**")  # bold = targets met


def test_update_json_merges_what_parallel_arms_write(tmp_path):
    out = tmp_path / "budget.json"
    budget_compare.update_json(out, {"runs": {"a@3min": {"steps": 1}}, "probe": {"x": 1}})
    budget_compare.update_json(out, {"runs": {"b@3min": {"steps": 2}}})
    assert set(json.loads(out.read_text())["runs"]) == {"a@3min", "b@3min"}
