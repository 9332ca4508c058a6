"""Average accuracy vs adapter rank for Surgery and SurgeryV2 on task arithmetic.

    python -m bench.rank_sweep [--config text-bench] [--ranks 4,8,16,32]
        [--modes surgery,surgeryv2] [--iterations N] [--eval-limit 500]

Every rank trains fresh adapters for the same number of iterations on the same unlabeled data;
the table also gives the adapter parameters each task adds and the time per iteration.

The bench's purpose is a curve (accuracy vs rank), so every rank is scored on test, with its
95 % interval; each mode's rank is CHOSEN on the validation rows (``val avg``), and the test
column is not used for the choice.
"""

from __future__ import annotations

import sys

from bench.analysis import (
    MODE_LABELS,
    Analysis,
    check_ranks,
    load_config,
    parse_list,
    parser,
    pct,
    pm,
    run_main,
)
from bench.common import print_table
from trainer.errors import UserError

NAME = "rank_sweep"


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__)
    p.add_argument("--ranks", default="4,8,16,32", help="adapter ranks to try")
    p.add_argument("--modes", default="surgery,surgeryv2", help="surgery modes to try")
    return run_main(p, run, argv)


def run(args) -> dict:
    config = load_config(args)
    ranks = sorted(set(parse_list(args.ranks, int, "--ranks")))
    modes = parse_list(args.modes, str, "--modes")
    if not ranks:
        raise UserError("--ranks is empty; give ranks such as 4,8,16,32")
    if not modes or set(modes) - {"surgery", "surgeryv2"}:
        raise UserError(f"--modes expects surgery and/or surgeryv2, got '{args.modes}'")
    check_ranks(config, ranks)

    a = Analysis(NAME, args, config)
    rows = []
    for rank in ranks:
        for mode in modes:
            model, result = a.surgery(mode, rank)
            params = sum(p.numel() for p in model.adapter_parameters()) // len(a.names)
            label = f"{MODE_LABELS[mode]} r{rank}"
            validation = a.validate(model, label)
            rows.append(
                {
                    **a.test(model, label),
                    "validation": validation,
                    "rank": rank,
                    "mode": mode,
                    "adapter_params_per_task": params,
                    "seconds_per_iteration": round(result.seconds_per_iteration, 4),
                    "loss_last": result.losses[-1] if result.losses else None,
                }
            )

    # each mode's rank is chosen on validation; the test curve is reported, never chosen by
    chosen = {
        m: max((r for r in rows if r["mode"] == m), key=lambda r: r["validation"]["avg"])
        for m in modes
    }
    for r in rows:
        r["chosen"] = chosen[r["mode"]] is r
    summary = (
        f"{config.name}: "
        + "; ".join(
            f"{MODE_LABELS[m]} rank {chosen[m]['rank']} chosen on {a.criterion} "
            f"({pct(chosen[m]['validation']['avg'])}), test {pm(chosen[m])} "
            f"(test by rank, not used for the choice: "
            f"{', '.join(pct(r['avg']) for r in rows if r['mode'] == m)})"
            for m in modes
        )
        + f"; {a.reference_text()}"
    )
    data = a.result(
        rank=ranks,
        modes=modes,
        rows=rows,
        chosen={m: chosen[m]["rank"] for m in modes},
        summary=summary,
    )

    def draw(ax):
        for mode in modes:
            points = [r for r in rows if r["mode"] == mode]
            ax.errorbar(
                [r["rank"] for r in points],
                [100 * r["avg"] for r in points],
                yerr=[
                    [100 * (r["avg"] - r["ci95"]["avg"][0]) for r in points],
                    [100 * (r["ci95"]["avg"][1] - r["avg"]) for r in points],
                ],
                marker="o",
                capsize=3,
                label=f"{MODE_LABELS[mode]} (test, 95 % interval)",
            )
            pick = chosen[mode]
            ax.plot([pick["rank"]], [100 * pick["avg"]], "r*", markersize=12)
        a.references(ax)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("adapter rank (red star: chosen on validation)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(a.title(f"accuracy vs rank, {a.iterations} iterations"))

    a.write(data, draw)
    print_table(
        ["rank", "mode", "params/task", "s/it", "val avg", *a.names, "test avg", "chosen"],
        [
            [
                r["rank"],
                MODE_LABELS[r["mode"]],
                r["adapter_params_per_task"],
                r["seconds_per_iteration"],
                pct(r["validation"]["avg"]),
                *(pm(r, t) for t in a.names),
                pm(r),
                "* (on validation)" if r["chosen"] else "",
            ]
            for r in rows
        ],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
