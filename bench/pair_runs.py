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
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, print_table, write_result
from trainer.errors import UserError, run_cli
from trainer.results import stats
from trainer.results.predictions import FILE, read_correct


@dataclass(frozen=True)
class Run:
    """One loaded run: where it is, its suite, the row it stands for by default (a fit's
    bundle row, an analysis's variant chosen on validation), the hash of its scored test
    rows and every row's per-row correctness."""

    path: Path
    suite: str | None
    default_row: str | None
    test_rows: dict
    correct: dict  # {row: {task: bool [N]}}

    def row(self, row: str | None, flag: str) -> str:
        """The row to compare: ``row``, else the run's default row."""
        if row is None:
            row = self.default_row
            if row is None:
                raise UserError(
                    f"{self.path} shipped no bundle row (nor chose a variant); name the row "
                    f"with {flag} (its rows: {', '.join(self.correct)})"
                )
        if row not in self.correct:
            raise UserError(
                f"{flag} '{row}' is not a row of {self.path}; its rows: {', '.join(self.correct)}"
            )
        return row


def load_run(path: Path, flag: str) -> Run:
    """A trainer.fit folder (or its results.json), or a bench analysis's JSON."""
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
    if analysis:  # rows are the analysis's own labels; its suite is its config
        run, suite = results_file, results.get("config")
        chosen = results.get("chosen")
        default_row = chosen if isinstance(chosen, str) else None
        correct_file = folder / results.get("correct_file", f"{path.stem}.correct.npz")
    else:
        run, suite = folder, results.get("suite")
        default_row = (results.get("bundle") or {}).get("row")
        correct_file = folder / FILE
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
    return Run(run, suite, default_row, results["test_rows"], correct)


def pair(a_path: Path, b_path: Path, row_a: str | None = None, row_b: str | None = None) -> dict:
    """Row ``row_a`` of run A against row ``row_b`` of run B (default: A's row when one is
    named, else each run's default row), paired on the tasks both scored on the same rows."""
    run_a, run_b = load_run(a_path, "RUN_A"), load_run(b_path, "RUN_B")
    row_a = run_a.row(row_a, "--row")
    row_b = run_b.row(row_a if row_b is None else row_b, "--row" if row_b is None else "--row-b")
    rows_a, rows_b = run_a.test_rows, run_b.test_rows
    common = [t for t in rows_a if t in rows_b]
    differ = [t for t in common if rows_a[t]["sha256"] != rows_b[t]["sha256"]]
    if differ:
        raise UserError(
            f"task {differ[0]} was scored on other test rows in {run_a.path} than in "
            f"{run_b.path} ({rows_a[differ[0]]['rows']} vs {rows_b[differ[0]]['rows']} rows, "
            "different content or order): runs can only be paired on the same rows"
        )
    correct_a, correct_b = run_a.correct[row_a], run_b.correct[row_b]
    scored = [t for t in common if t in correct_a and t in correct_b]
    if not scored:
        raise UserError(f"{run_a.path} and {run_b.path} have no labelled task in common to pair on")
    left_out = sorted((set(rows_a) | set(rows_b)) - set(scored))
    name_a, name_b = f"A {row_a}", f"B {row_b}"
    a = {t: correct_a[t] for t in scored}
    b = {t: correct_b[t] for t in scored}
    comparison = stats.compare(a, b, name_a, name_b)
    return {
        "a": {"run": str(run_a.path), "suite": run_a.suite, "row": row_a},
        "b": {"run": str(run_b.path), "suite": run_b.suite, "row": row_b},
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
        f"[{100 * lo:+.1f}, {100 * hi:+.1f}], {stats.p_clause(comparison['p_value'])}"
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
