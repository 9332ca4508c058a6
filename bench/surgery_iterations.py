"""Average accuracy vs surgery iterations (the paper's Fig. 11: SurgeryV2 at 200 iterations
beat Surgery at 1,000).

    python -m bench.surgery_iterations [--config text-bench] [--surgery-iterations 1000]
        [--surgeryv2-iterations 400] [--checkpoints 0,25,50,100,200,400,1000] [--eval-limit 500]

Merges with task arithmetic once, then trains Surgery and SurgeryV2 adapters of the same rank
(the config's surgery.rank) and scores both on the same test rows at every checkpoint not past
the mode's budget (and at the budget itself), from a callback the surgery loop runs after a
step; its time is not counted in seconds per iteration. Iteration 0 is the merged model: the
adapters start as the identity (W_up = 0), so its score is the no-surgery reference.

A curve, not a choice: every point is a test score with its 95 % interval, and the summary's
"beats" / "below" / "ties within noise" is the paired test of the two points on the same rows.
"""

from __future__ import annotations

import sys

from bench.analysis import (
    METHOD,
    MODE_LABELS,
    Analysis,
    load_config,
    parse_list,
    parser,
    pm,
    run_main,
)
from bench.common import print_table
from trainer.errors import UserError
from trainer.results.stats import p_clause

NAME = "surgery_iterations"
MODES = ("surgery", "surgeryv2")


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__, iterations=False)
    p.add_argument("--surgery-iterations", type=int, default=1000, help="Surgery's budget")
    p.add_argument("--surgeryv2-iterations", type=int, default=400, help="SurgeryV2's budget")
    p.add_argument(
        "--checkpoints",
        default="0,25,50,100,200,400,1000",
        help="iterations at which to score (those within each mode's budget, plus the budget)",
    )
    p.add_argument(
        "--compare-at",
        type=int,
        default=200,
        help="the SurgeryV2 iteration the summary compares with Surgery's last",
    )
    return run_main(p, run, argv)


def run(args) -> dict:
    config = load_config(args)
    budgets = {"surgery": args.surgery_iterations, "surgeryv2": args.surgeryv2_iterations}
    for mode, budget in budgets.items():
        if budget < 1:
            raise UserError(f"--{mode}-iterations must be >= 1, got {budget}")
    checkpoints = parse_list(args.checkpoints, int, "--checkpoints")
    if not checkpoints or min(checkpoints) < 0:
        raise UserError(f"--checkpoints expects iteration counts >= 0, got '{args.checkpoints}'")

    a = Analysis(NAME, args, config)
    curves, stats = {}, {}
    for mode in MODES:
        budget = budgets[mode]
        marks = sorted({c for c in checkpoints if c <= budget} | {budget})
        scores = {0: a.merged} if 0 in marks else {}

        def record(step, model, mode=mode, marks=marks, scores=scores):
            if step in marks:
                scores[step] = a.test(model, f"{MODE_LABELS[mode]} @{step}")

        _, result = a.surgery(mode, iterations=budget, callback=record)
        curves[mode] = [
            {"iteration": k, **scores[k], "loss": result.losses[k - 1] if k else None}
            for k in marks
        ]
        stats[mode] = {
            "iterations": budget,
            "checkpoints": marks,
            "seconds_per_iteration": round(result.seconds_per_iteration, 4),
            "train_seconds": round(result.seconds_per_iteration * budget, 1),
        }

    # ---- summary: SurgeryV2 at --compare-at (or its nearest earlier checkpoint) vs Surgery's last
    v2 = curves["surgeryv2"]
    early = [p for p in v2 if p["iteration"] <= args.compare_at] or v2[:1]
    v2_point, v1_point = early[-1], curves["surgery"][-1]
    # a paired test on the same test rows (iteration 0 of either is the merged row itself)
    labels = [
        METHOD if p["iteration"] == 0 else f"{MODE_LABELS[m]} @{p['iteration']}"
        for m, p in (("surgeryv2", v2_point), ("surgery", v1_point))
    ]
    paired = a.compare(*labels)
    summary = (
        f"{config.name}: SurgeryV2 at {v2_point['iteration']} it {pm(v2_point)} "
        f"{paired['verdict']} Surgery at {v1_point['iteration']} it {pm(v1_point)} "
        f"({p_clause(paired['p_value'], 'paired p')}); {a.reference_text()}"
    )
    data = a.result(
        iterations=budgets,
        curves=curves,
        modes=stats,
        comparison={
            "surgeryv2_iteration": v2_point["iteration"],
            "surgeryv2_avg": v2_point["avg"],
            "surgery_iteration": v1_point["iteration"],
            "surgery_avg": v1_point["avg"],
            "paired": paired,
            "surgeryv2_beats_surgery": paired["verdict"] == "beats",
        },
        summary=summary,
    )

    def draw(ax):
        for mode in MODES:
            xs = [p["iteration"] for p in curves[mode]]
            ax.plot(xs, [100 * p["avg"] for p in curves[mode]], marker="o", label=MODE_LABELS[mode])
        a.references(ax)
        ax.set_xlabel("surgery iterations")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(a.title(f"accuracy vs iterations, rank {config.surgery.rank}"))

    a.write(data, draw)
    table = {m: {p["iteration"]: p for p in curves[m]} for m in MODES}
    steps = sorted(set(table["surgery"]) | set(table["surgeryv2"]))
    print_table(
        ["iterations", *(f"{MODE_LABELS[m]} avg" for m in MODES)],
        [[k, *(pm(table[m][k]) if k in table[m] else "" for m in MODES)] for k in steps],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
