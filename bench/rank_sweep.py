"""Average accuracy vs adapter rank for Surgery and SurgeryV2 on task arithmetic.

    python -m bench.rank_sweep [--config text-bench] [--ranks 4,8,16,32]
        [--modes surgery,surgeryv2] [--iterations N] [--eval-limit 500]

Every rank trains fresh adapters for the same number of iterations on the same unlabeled data;
the table also gives the adapter parameters each task adds and the time per iteration.
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
    row,
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
            scored = a.score(model, f"{MODE_LABELS[mode]} r{rank}")
            rows.append(
                row(
                    scored["acc"],
                    rank=rank,
                    mode=mode,
                    adapter_params_per_task=params,
                    seconds_per_iteration=round(result.seconds_per_iteration, 4),
                    loss_last=result.losses[-1] if result.losses else None,
                )
            )

    best = {m: max((r for r in rows if r["mode"] == m), key=lambda r: r["avg"]) for m in modes}
    summary = (
        f"{config.name}: "
        + "; ".join(
            f"{MODE_LABELS[m]} best at rank {best[m]['rank']} {pct(best[m]['avg'])} "
            f"(ranks {', '.join(pct(r['avg']) for r in rows if r['mode'] == m)})"
            for m in modes
        )
        + f"; {a.reference_text()}"
    )
    data = a.result(rank=ranks, modes=modes, rows=rows, summary=summary)

    def draw(ax):
        for mode in modes:
            points = [r for r in rows if r["mode"] == mode]
            ax.plot(
                [r["rank"] for r in points],
                [100 * r["avg"] for r in points],
                marker="o",
                label=MODE_LABELS[mode],
            )
        a.references(ax)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("adapter rank")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(a.title(f"accuracy vs rank, {a.iterations} iterations"))

    a.write(data, draw)
    print_table(
        ["rank", "mode", "params/task", "s/it", *a.names, "avg"],
        [
            [
                r["rank"],
                MODE_LABELS[r["mode"]],
                r["adapter_params_per_task"],
                r["seconds_per_iteration"],
                *(pct(r["acc"][t]) for t in a.names),
                pct(r["avg"]),
            ]
            for r in rows
        ],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
