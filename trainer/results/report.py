"""Results: rows, the paper-form table and its footnote, results.json."""

from __future__ import annotations

from pathlib import Path

from modeldir import write_json_atomic

from ..data.validation import ValidationSet
from ..merging.search import SearchResult

NO_LABELS = "no labels"  # the table's cell for a task without a labelled test split


def results_row(method: str, surgery: str, acc: dict[str, float | None]) -> dict:
    """One row; ``acc[task]`` is None for a task without test labels, and ``avg`` is the mean
    over the scored tasks (None when no task is)."""
    scored = [v for v in acc.values() if v is not None]
    avg = sum(scored) / len(scored) if scored else None
    return {"method": method, "surgery": surgery, "acc": acc, "avg": avg}


def _cell(value: float | None) -> str:
    return NO_LABELS if value is None else f"{100 * value:.1f}"


def row_label(row: dict) -> str:
    if row["surgery"] == "none":
        return row["method"]
    return f"{row['method']} w/ {'SurgeryV2' if row['surgery'] == 'surgeryv2' else 'Surgery'}"


def format_table(tasks: list[str], rows: list[dict]) -> str:
    """The paper's form: one row per method, tasks as columns, Avg last, percentages; a task
    without test labels reads "no labels" (and is left out of Avg)."""
    first = max(len("Method"), *(len(row_label(r)) for r in rows))
    unscored = any(r["acc"][t] is None for r in rows for t in tasks)
    widths = [max(len(NO_LABELS) if unscored else 6, len(t)) for t in tasks]
    header = " | ".join(
        ["Method".ljust(first), *(t.rjust(w) for t, w in zip(tasks, widths)), "Avg".rjust(6)]
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [_cell(row["acc"][t]).rjust(w) for t, w in zip(tasks, widths)]
        avg = "-" if row["avg"] is None else f"{100 * row['avg']:.1f}"
        lines.append(" | ".join([row_label(row).ljust(first), *cells, avg.rjust(6)]))
    return "\n".join(lines)


def search_line(result: SearchResult, validation: ValidationSet, notes: list[str]) -> str:
    """One log line per search: ``task_arithmetic: λ=0.45 chosen on validation (avg 71.2 %,
    grid 0.05..1.0, 20 candidates, 84 s)``, saying how and on what it was chosen."""
    if validation.criterion == "accuracy":
        how, avg = "on validation", f"avg {100 * result.score:.1f} %"
    else:
        how = "by agreement with the experts on validation inputs"
        avg = f"avg agreement {100 * result.score:.1f} %"
    pinned = f", {result.pinned_values()} pinned" if result.pinned else ""
    return (
        f"{result.method}: {result.values()} chosen {how}{pinned} ({avg}, {result.grid_text()}, "
        f"{len(result.candidates)} candidates, {result.seconds:.0f} s)"
        + "".join(f"; {note}" for note in notes)
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
