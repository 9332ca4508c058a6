"""Results: rows with their 95 % intervals, gap closure and paired comparisons, the
paper-form table and its footnotes, results.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modeldir import write_json_atomic

from ..data.validation import ValidationSet
from ..merging.search import SearchResult
from . import stats
from .evaluate import Evaluation

NO_LABELS = "no labels"  # the table's cell for a task without a labelled test split
INDIVIDUAL = "individual/none"


def results_row(method: str, surgery: str, evaluation: Evaluation) -> dict:
    """One row of results.json: ``acc[task]`` (None for a task without test labels), ``avg``
    the mean over the scored tasks (None when no task is), and ``ci95``: each accuracy's
    95 % interval, ``{task: [lo, hi], ..., "avg": [lo, hi]}`` (see :mod:`.stats`)."""
    return {
        "method": method,
        "surgery": surgery,
        "acc": evaluation.acc,
        "avg": evaluation.avg,
        "ci95": stats.ci95(evaluation.correct),
    }


def row_key(row: dict) -> str:
    """``<method>/<surgery>``: how results.json's ``bias``, ``gap_closure`` and
    ``comparisons`` name a row."""
    return f"{row['method']}/{row['surgery']}"


def paired_statistics(
    rows: list[dict],
    correct: Mapping[str, stats.Correct],
    seed: int,
    bundle: Mapping | None = None,
) -> dict:
    """results.json's ``gap_closure`` and ``comparisons``, from every row's per-row test
    correctness ``correct[row_key]`` (all rows were scored on the same test rows).

    - ``gap_closure["<method>/<mode>"]``: every merged + surgery row against its plain merge
      (``<method>/none``) and the experts, with its paired-bootstrap 95 % interval.
    - ``comparisons``: the best surgered row against ``individual`` by the paired test, then
      the bundle's row if it is another one. "Best" is chosen on VALIDATION (the bundle
      choice's ``scores``, by its ``criterion``) so that the row compared was not picked for
      its test number; without validation scores it falls back to the highest test average,
      and says so (``chosen_by``).
    """
    keyed = {row_key(r): r for r in rows}
    closure: dict[str, dict] = {}
    if INDIVIDUAL in correct:
        for key, row in keyed.items():
            plain = f"{row['method']}/none"
            if row["surgery"] == "none" or plain not in correct or key not in correct:
                continue
            result = stats.gap_closure(correct[key], correct[plain], correct[INDIVIDUAL], seed)
            closure[key] = {"merged": plain, **result.to_json()}
    comparisons = []
    if INDIVIDUAL not in correct:
        return {"gap_closure": closure, "comparisons": comparisons}
    candidates = []  # (row key, how it was chosen)
    surgered = [k for k, r in keyed.items() if r["surgery"] != "none" and k in correct]
    bundle = bundle or {}
    scores = bundle.get("scores") or {}
    # the scores are validation accuracies, or agreement with the experts on validation
    # inputs, whatever chose the bundle's row (the config may name it; "only row" has none)
    shipped_by = bundle.get("criterion") or "validation"
    criterion = shipped_by if shipped_by in ("validation", "agreement") else "validation"
    if len(surgered) == 1:
        candidates.append((surgered[0], "the only surgered row"))
    elif surgered:
        if all(scores.get(k) is not None for k in surgered):
            candidates.append((max(surgered, key=lambda k: scores[k]), criterion))
        else:
            best = max(surgered, key=lambda k: _test_avg(keyed[k]))
            candidates.append(
                (best, "test (no validation scores): the interval and p-value are optimistic")
            )
    shipped = bundle.get("row")
    if shipped in correct and shipped != INDIVIDUAL and shipped not in dict(candidates):
        candidates.append((shipped, f"bundle ({shipped_by})"))
    for key, chosen_by in candidates:
        if keyed[key]["avg"] is not None:
            result = stats.compare(correct[key], correct[INDIVIDUAL], key, "individual")
            comparisons.append({"chosen_by": chosen_by, **result.to_json()})
    return {"gap_closure": closure, "comparisons": comparisons}


def _test_avg(row: dict) -> float:
    return -1.0 if row["avg"] is None else row["avg"]


def _cell(value: float | None, interval: list[float] | None) -> str:
    """``89.0±0.7``: the accuracy and the larger side of its 95 % interval, in points."""
    if value is None:
        return NO_LABELS
    if interval is None:
        return f"{100 * value:.1f}"
    half = max(value - interval[0], interval[1] - value)
    return f"{100 * value:.1f}±{100 * half:.1f}"


def row_label(row: dict) -> str:
    if row["surgery"] == "none":
        return row["method"]
    return f"{row['method']} w/ {'SurgeryV2' if row['surgery'] == 'surgeryv2' else 'Surgery'}"


def format_table(tasks: list[str], rows: list[dict]) -> str:
    """The paper's form: one row per method, tasks as columns, Avg last, percentages, each
    with the larger side of its 95 % interval (``89.0±0.7``); a task without test labels
    reads "no labels" (and is left out of Avg)."""
    cells = [
        [_cell(r["acc"][t], r.get("ci95", {}).get(t)) for t in tasks]
        + ["-" if r["avg"] is None else _cell(r["avg"], r.get("ci95", {}).get("avg"))]
        for r in rows
    ]
    first = max(len("Method"), *(len(row_label(r)) for r in rows))
    names = [*tasks, "Avg"]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    header = " | ".join(["Method".ljust(first), *(n.rjust(w) for n, w in zip(names, widths))])
    lines = [header, "-" * len(header)]
    for row, line in zip(rows, cells, strict=True):
        lines.append(
            " | ".join([row_label(row).ljust(first), *(c.rjust(w) for c, w in zip(line, widths))])
        )
    return "\n".join(lines)


def interval_footnote() -> str:
    """What the table's ``±`` means."""
    return (
        "±: the larger side of the 95 % interval (Wilson per task; Avg: the mean of the "
        "tasks' accuracies, variance summed over tasks)"
    )


def protocol_line(unlabeled: Mapping | None) -> str | None:
    """Which inputs surgery (and AdaMerging) learned from, from results.json's
    ``unlabeled``: ``surgery learned from: train inputs, labels dropped (inductive, 1800
    rows per task, 0 shared with the scored test rows)``; None when no pool was recorded."""
    if not unlabeled:
        return None
    source = str(unlabeled.get("source"))
    what = {"train": "train inputs, labels dropped", "test": "the test inputs"}.get(
        source, f"{source[5:]}'s test inputs" if source.startswith("task:") else source
    )
    counts = sorted(set((unlabeled.get("rows") or {}).values()))
    rows = (
        ""
        if not counts
        else f", {counts[0]} rows per task"
        if len(counts) == 1
        else f", {counts[0]}-{counts[-1]} rows per task"
    )
    overlap = unlabeled.get("overlap_with_test")
    shared = "" if overlap is None else f", {overlap} shared with the scored test rows"
    return f"surgery learned from: {what} ({unlabeled.get('protocol')}{rows}{shared})"


def summary_line(suite: str, rows: list[dict], paired: dict) -> str:
    """The run's one-line verdict: the compared row's average with its interval, its gap
    closure with its interval, and the paired test against the experts."""
    comparison = (paired.get("comparisons") or [None])[0]
    individual = next((r for r in rows if row_key(r) == INDIVIDUAL), None)
    if comparison is None or individual is None:
        return ""
    key = comparison["a"]
    row = next(r for r in rows if row_key(r) == key)
    text = f"{suite}: {row_label(row)} {_avg_text(row)}"
    closure = paired["gap_closure"].get(key)
    if closure is not None and closure["value"] is not None:
        ci = closure["ci95"]
        interval = "" if ci is None else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
        text += f", gap closure {100 * closure['value']:.0f} %{interval}"
    how = {
        "validation": "chosen on validation",
        "agreement": "chosen by agreement with the experts on validation",
        "the only surgered row": "the only surgered row",
        "only row": "the only row",
    }
    chosen_by = comparison["chosen_by"]
    if chosen_by.startswith("bundle (") and chosen_by.endswith(")"):
        inner = chosen_by[len("bundle (") : -1]
        chosen = f"the bundle's row, {how.get(inner, inner)}"
    else:
        chosen = how.get(chosen_by, "best on test")
    return (
        f"{text} ({chosen}) vs individual {_avg_text(individual)}: {comparison['verdict']} "
        f"({100 * comparison['difference']:+.1f} points, "
        f"{stats.p_clause(comparison['p_value'], 'paired p')})"
    )


def _avg_text(row: dict) -> str:
    return _cell(row["avg"], row.get("ci95", {}).get("avg"))


def search_line(result: SearchResult, validation: ValidationSet, notes: list[str]) -> str:
    """One log line per search: ``task_arithmetic: λ=0.45 chosen on validation (avg 71.2 %,
    grid 0.05..1.0, 9 of 20 candidates (coarse-to-fine), 31 s)``, saying how and on what it
    was chosen."""
    if validation.criterion == "accuracy":
        how, avg = "on validation", f"avg {100 * result.score:.1f} %"
    else:
        how = "by agreement with the experts on validation inputs"
        avg = f"avg agreement {100 * result.score:.1f} %"
    pinned = f", {result.pinned_values()} pinned" if result.pinned else ""
    return (
        f"{result.method}: {result.values()} chosen {how}{pinned} ({avg}, {result.grid_text()}, "
        f"{result.counted()}, {result.seconds:.0f} s)" + "".join(f"; {note}" for note in notes)
    )


def search_footnote(
    searches: dict[str, SearchResult], validation: ValidationSet, notes: list[str]
) -> str:
    """Under the table: ``task_arithmetic λ=0.45, ties_merging λ=0.6 k=20: chosen on 200
    validation rows per task``."""
    chosen = ", ".join(
        f"{m} {r.values()}" + (f" ({r.pinned_values()} pinned)" if r.pinned else "")
        for m, r in searches.items()
    )
    rows = sorted(set(validation.rows()))
    count = str(rows[0]) if len(rows) == 1 else f"{rows[0]}-{rows[-1]}"
    if validation.criterion == "accuracy":
        how = f"chosen on {count} validation rows per task"
    else:
        how = f"chosen by agreement with the experts on {count} validation inputs per task"
    return f"{chosen}: {how}" + "".join(f"; {note}" for note in notes)


def write_results(path: Path, results: dict) -> None:
    write_json_atomic(path, results)


def save_plot(path: Path, draw) -> None:
    """One matplotlib (Agg) figure filled by ``draw(ax)``, written to a temporary name then
    renamed (the trainer's bias plot and the bench analyses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_bias(path: Path, bias: dict[str, list[float]], title: str) -> None:
    """Representation bias per block for each method/surgery row (the paper's Fig. 10)."""
    if not bias:
        return

    def draw(ax):
        for label, values in bias.items():
            style = {"none": "-", "surgery": "--", "surgeryv2": ":"}[label.split("/")[1]]
            ax.plot(range(1, len(values) + 1), values, style, marker="o", label=label)
        blocks = len(next(iter(bias.values())))
        ax.set_xticks(range(1, blocks + 1), [*map(str, range(1, blocks)), "final"])
        ax.set_xlabel("block")
        ax.set_ylabel("representation bias (mean L1 to the expert)")
        ax.set_title(f"{title}: representation bias per block")

    save_plot(path, draw)
