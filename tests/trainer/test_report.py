"""trainer.results.report: rows with intervals, gap closure and the paired comparison, the
table's ``±`` cells, the protocol line and the one-line summary."""

import numpy as np
import pytest

from trainer.results import stats
from trainer.results.evaluate import Evaluation
from trainer.results.report import (
    format_table,
    paired_statistics,
    protocol_line,
    results_row,
    row_key,
    summary_line,
)


def evaluation(correct: dict) -> Evaluation:
    return Evaluation(
        {n: None if c is None else float(np.mean(c)) for n, c in correct.items()}, correct
    )


def _suite(seed: int = 0):
    """individual, a plain merge and two surgered rows on the same 600 + 400 test rows."""
    rng = np.random.default_rng(seed)
    ind = {"a": rng.random(600) < 0.9, "b": rng.random(400) < 0.7}
    ta = {"a": rng.random(600) < 0.8, "b": rng.random(400) < 0.55}
    # v2 reproduces the experts on 95 % of the rows, surgery (last layer) on 60 %
    v2 = {k: np.where(rng.random(v.size) < 0.95, v, ta[k]) for k, v in ind.items()}
    v1 = {k: np.where(rng.random(v.size) < 0.6, v, ta[k]) for k, v in ind.items()}
    named = [
        ("individual", "none", ind),
        ("task_arithmetic", "none", ta),
        ("task_arithmetic", "surgery", v1),
        ("task_arithmetic", "surgeryv2", v2),
    ]
    rows = [results_row(m, s, evaluation(c)) for m, s, c in named]
    return rows, {row_key(r): c for r, (_, _, c) in zip(rows, named)}


def test_results_row_carries_ci95_for_every_accuracy():
    correct = {"a": np.array([1] * 8 + [0] * 2, bool), "b": None}
    row = results_row("task_arithmetic", "surgeryv2", evaluation(correct))
    assert row["acc"] == {"a": 0.8, "b": None} and row["avg"] == 0.8
    assert row["ci95"]["a"] == [0.490162, 0.943318]  # Wilson, 8 of 10
    assert row["ci95"]["b"] is None and row["ci95"]["avg"][0] < 0.8 < row["ci95"]["avg"][1]
    assert row_key(row) == "task_arithmetic/surgeryv2"


def test_paired_statistics_gap_closure_and_the_validation_chosen_comparison():
    rows, correct = _suite()
    # validation prefers Surgery although SurgeryV2 is better on test: the comparison must
    # follow validation, not the test number
    scores = {"task_arithmetic/surgery": 0.9, "task_arithmetic/surgeryv2": 0.8}
    bundle = {"row": "task_arithmetic/surgery", "criterion": "validation", "scores": scores}
    out = paired_statistics(rows, correct, seed=0, bundle=bundle)
    assert set(out["gap_closure"]) == {"task_arithmetic/surgery", "task_arithmetic/surgeryv2"}
    v2 = out["gap_closure"]["task_arithmetic/surgeryv2"]
    assert v2["merged"] == "task_arithmetic/none" and v2["seed"] == 0
    assert v2["ci95"][0] <= v2["value"] <= v2["ci95"][1] and v2["value"] > 0.8
    [comparison] = out["comparisons"]
    assert comparison["a"] == "task_arithmetic/surgery" and comparison["b"] == "individual"
    assert comparison["chosen_by"] == "validation" and comparison["verdict"] == "below"
    expected = stats.compare(correct["task_arithmetic/surgery"], correct["individual/none"])
    assert comparison["p_value"] == pytest.approx(expected.p_value, rel=1e-3)
    # a bundle row other than the compared one is compared too
    shipped = {**bundle, "row": "task_arithmetic/none"}
    first, second = paired_statistics(rows, correct, seed=0, bundle=shipped)["comparisons"]
    assert first == comparison
    assert second["a"] == "task_arithmetic/none" and second["chosen_by"] == "bundle (validation)"
    # without validation scores: the best test row, said to be optimistic
    [fallback] = paired_statistics(rows, correct, seed=0)["comparisons"]
    assert fallback["a"] == "task_arithmetic/surgeryv2" and "test" in fallback["chosen_by"]
    assert paired_statistics(rows, correct, seed=0) == paired_statistics(rows, correct, seed=0)
    # a single surgered row is compared without any choice
    alone = [r for r in rows if r["surgery"] != "surgery"]
    [only] = paired_statistics(alone, correct, seed=0)["comparisons"]
    assert only["a"] == "task_arithmetic/surgeryv2" and only["chosen_by"] == "the only surgered row"


def test_table_cells_carry_the_interval():
    rows, _ = _suite()
    table = format_table(["a", "b"], rows)
    lines = table.splitlines()
    assert lines[0].split("|")[-1].strip() == "Avg"
    v2 = next(line for line in lines if "w/ SurgeryV2" in line)
    cells = [c.strip() for c in v2.split("|")[1:]]
    row = rows[3]
    for cell, value, ci in zip(
        cells,
        [row["acc"]["a"], row["acc"]["b"], row["avg"]],
        [row["ci95"]["a"], row["ci95"]["b"], row["ci95"]["avg"]],
    ):
        shown, half = cell.split("±")
        assert float(shown) == pytest.approx(100 * value, abs=0.05)
        assert float(half) == pytest.approx(100 * max(value - ci[0], ci[1] - value), abs=0.05)
    unscored = results_row("x", "none", evaluation({"a": None, "b": np.ones(3, bool)}))
    assert "no labels" in format_table(["a", "b"], [unscored])


def test_protocol_line_and_summary():
    line = protocol_line(
        {
            "protocol": "inductive",
            "source": "train",
            "rows": {"a": 1800, "b": 1200},
            "overlap_with_test": 0,
        }
    )
    assert line == (
        "surgery learned from: train inputs, labels dropped "
        "(inductive, 1200-1800 rows per task, 0 shared with the scored test rows)"
    )
    line = protocol_line({"protocol": "transductive", "source": "test", "rows": {"a": 24}})
    assert line == "surgery learned from: the test inputs (transductive, 24 rows per task)"
    assert protocol_line(None) is None
    rows, correct = _suite()
    results = paired_statistics(rows, correct, seed=0)
    summary = summary_line("suite", rows, results)
    comparison = results["comparisons"][0]
    assert summary.startswith("suite: task_arithmetic w/ SurgeryV2 ")
    assert "gap closure" in summary and f"individual {rows[0]['avg'] * 100:.1f}±" in summary
    assert f": {comparison['verdict']} (" in summary
    assert "paired p = " in summary and "best on test" in summary
    # no surgered row: the bundle's row is compared, and the line says how it was chosen
    plain = [r for r in rows if r["surgery"] == "none"]
    for criterion, words in (("only row", "the only row"), ("validation", "chosen on validation")):
        bundle = {"row": "task_arithmetic/none", "criterion": criterion, "scores": {}}
        results = paired_statistics(plain, correct, seed=0, bundle=bundle)
        assert results["comparisons"][0]["chosen_by"] == f"bundle ({criterion})"
        summary = summary_line("suite", plain, results)
        assert f"(the bundle's row, {words})" in summary and "best on test" not in summary
