"""Pair two runs on the same test rows: does a change of config move a row?

    python -m bench.pair_runs RUN_A RUN_B [--row ROW] [--row-b ROW] [--out DIR]

RUN_A and RUN_B are ``trainer.fit --out`` folders (or their results.json), or the JSON of a
bench analysis (``bench.surgery_ablation``, ``bench.rank_sweep``, ...). Each run keeps every
row's per-row correctness (``correct.npz``; an analysis ``<name>.correct.npz``) and a hash of
the test rows it scored (``test_rows``). Two independent intervals overlapping say little
when both runs scored the same inputs; this pairs them: row ROW of run A against row ROW_B
of run B (default: each run's bundle row, an analysis's chosen variant; ``--row`` alone
names the row of both) with the exact McNemar test per task and the stratified paired test
of the average (``trainer.results.stats.compare``). A task is compared only when both runs
scored exactly the same rows (same inputs, labels and order); a task in one run only is
left out and named. Writes ``<out>/pair_runs.json``; the last printed line is a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import RESULTS, print_table, write_result
from trainer.errors import UserError, run_cli
from trainer.results import stats
from trainer.results.predictions import FILE, read_correct


def load_run(path: Path, flag: str) -> tuple[Path, dict, dict]:
    """A trainer.fit folder (or its results.json), or a bench analysis's JSON ->
    (the run's path, its results, {row: {task: bool [N]}})."""
    analysis = path.suffix == ".json" and path.name != "results.json"
    folder = path.parent if path.suffix == ".json" else path
    results_file = path if analysis else folder / "results.json"
    if not results_file.is_file():
        raise UserError(
            f"{flag} {path}: no results.json there; give a trainer.fit --out folder or a "
            "bench analysis's JSON"
        )
    try:
        results = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag} {results_file} cannot be read as JSON ({exc})") from None
    if not isinstance(results, dict):
        raise UserError(f"{flag} {results_file} is not a run's results (a JSON object)")
    if analysis:
        # a bench analysis: rows are its own labels; its suite is its config; its pick (a
        # variant chosen on validation) stands in for the bundle row
        results.setdefault("suite", results.get("config"))
        if isinstance(results.get("chosen"), str):
            results.setdefault("bundle", {"row": results["chosen"]})
    run = results_file if analysis else folder
    correct_file = folder / (results.get("correct_file", FILE) if analysis else FILE)
    if not correct_file.is_file() or "test_rows" not in results:
        what = "bench analyses" if analysis else "runs of trainer.fit"
        raise UserError(
            f"{flag} {run} keeps no per-row results ({correct_file.name} and test_rows in "
            f"{results_file.name}); {what} from this version on do: run it again"
        )
    try:
        correct = read_correct(correct_file)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {correct_file} is not a readable {FILE} ({exc})") from None
    return run, results, correct


def pick_row(results: dict, correct: dict, row: str | None, flag: str, run: Path) -> str:
    """The row to compare: ``row``, else the run's bundle row."""
    if row is None:
        row = (results.get("bundle") or {}).get("row")
        if row is None:
            raise UserError(
                f"{run} shipped no bundle row (nor chose a variant); name the row with {flag} "
                f"(its rows: {', '.join(correct)})"
            )
    if row not in correct:
        raise UserError(f"{flag} '{row}' is not a row of {run}; its rows: {', '.join(correct)}")
    return row


def pair(a_path: Path, b_path: Path, row_a: str | None = None, row_b: str | None = None) -> dict:
    """Row ``row_a`` of run A against row ``row_b`` of run B (default: A's row when one is
    named, else each run's bundle row), paired on the tasks both scored on the same rows."""
    run_a, results_a, correct_a = load_run(a_path, "RUN_A")
    run_b, results_b, correct_b = load_run(b_path, "RUN_B")
    flag_b = "--row" if row_b is None else "--row-b"
    row_a = pick_row(results_a, correct_a, row_a, "--row", run_a)
    row_b = pick_row(results_b, correct_b, row_a if row_b is None else row_b, flag_b, run_b)
    rows_a, rows_b = results_a["test_rows"], results_b["test_rows"]
    common = [t for t in rows_a if t in rows_b]
    differ = [t for t in common if rows_a[t]["sha256"] != rows_b[t]["sha256"]]
    if differ:
        raise UserError(
            f"task {differ[0]} was scored on other test rows in {run_a} than in {run_b} "
            f"({rows_a[differ[0]]['rows']} vs {rows_b[differ[0]]['rows']} rows, different "
            "content or order): runs can only be paired on the same rows"
        )
    scored = [t for t in common if t in correct_a[row_a] and t in correct_b[row_b]]
    if not scored:
        raise UserError(f"{run_a} and {run_b} have no labelled task in common to pair on")
    left_out = sorted((set(rows_a) | set(rows_b)) - set(scored))
    name_a, name_b = f"A {row_a}", f"B {row_b}"
    a = {t: correct_a[row_a][t] for t in scored}
    b = {t: correct_b[row_b][t] for t in scored}
    comparison = stats.compare(a, b, name_a, name_b)
    return {
        "a": {"run": str(run_a), "suite": results_a.get("suite"), "row": row_a},
        "b": {"run": str(run_b), "suite": results_b.get("suite"), "row": row_b},
        "tasks": scored,
        "left_out": left_out,
        "acc": {
            "a": {t: float(a[t].mean()) for t in scored},
            "b": {t: float(b[t].mean()) for t in scored},
        },
        "ci95": {"a": stats.ci95(a), "b": stats.ci95(b)},
        "comparison": comparison.to_json(),
    }


def report(data: dict) -> str:
    comparison = data["comparison"]
    acc, ci = data["acc"], data["ci95"]

    def cell(side: str, task: str) -> str:
        lo, hi = ci[side][task]
        return f"{100 * acc[side][task]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    rows = [
        [
            t,
            comparison["per_task"][t]["rows"],
            cell("a", t),
            cell("b", t),
            comparison["per_task"][t]["a_only"],
            comparison["per_task"][t]["b_only"],
            f"{100 * comparison['per_task'][t]['difference']:+.1f}",
            stats.p_text(comparison["per_task"][t]["p_value"]),
            comparison["per_task"][t]["verdict"],
        ]
        for t in data["tasks"]
    ]
    lo, hi = comparison["difference_ci95"]
    summary = (
        f"{data['a']['suite']} {data['a']['row']} (A) vs {data['b']['suite']} "
        f"{data['b']['row']} (B) on {len(data['tasks'])} tasks' same test rows: A "
        f"{comparison['verdict']} B, {100 * comparison['difference']:+.1f} points "
        f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p = {stats.p_text(comparison['p_value'])}"
        + (
            f"; left out (not in both runs): {', '.join(data['left_out'])}"
            if data["left_out"]
            else ""
        )
    )
    header = [
        "task",
        "rows",
        "A acc [95 %]",
        "B acc [95 %]",
        "A only",
        "B only",
        "A−B",
        "p",
        "verdict",
    ]
    print_table(header, rows, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.pair_runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_a",
        type=Path,
        metavar="RUN_A",
        help="a trainer.fit --out folder, or an analysis's JSON",
    )
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="another one, on the same tasks")
    p.add_argument("--row", default=None, help="<method>/<mode> of A (and of B without --row-b)")
    p.add_argument("--row-b", default=None, help="<method>/<mode> of B")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for pair_runs.json")
    args = p.parse_args(argv)

    def work() -> str:
        data = pair(args.run_a, args.run_b, args.row, args.row_b)
        summary = report(data)
        write_result("pair_runs", {**data, "summary": summary}, args.out)
        return summary

    code, _ = run_cli(work)
    return code


if __name__ == "__main__":
    sys.exit(main())
