"""How much unlabeled data SurgeryV2 needs (the paper's Table VI): 1%, 10% and 100% of each
task's unlabeled inputs.

    python -m bench.unlabeled_fraction [--config text-bench] [--fractions 0.01,0.1,1.0]
        [--mode surgeryv2] [--iterations N] [--eval-limit 500]

The pool is the config's unlabeled data (``surgery.unlabeled``: by default each task's train
inputs without their labels; ``"test"``: its test inputs, the paper's setting). A fraction
keeps a seeded random part of every task's pool, the smaller fractions nested in the larger
ones; the experts' targets of those rows are the ones already computed for the pool, so
nothing is recomputed. Every fraction trains for the same number of iterations and is scored
on the same (``--eval-limit``) test rows, each with its 95 % interval and its gap closure with
a paired-bootstrap interval. A curve: nothing is chosen.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from bench.analysis import (
    MODE_LABELS,
    Analysis,
    closure_text,
    load_config,
    parse_list,
    parser,
    pm,
    run_main,
)
from bench.common import print_table
from trainer.errors import UserError

NAME = "unlabeled_fraction"


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__)
    p.add_argument("--fractions", default="0.01,0.1,1.0", help="fractions of the pool, in (0, 1]")
    p.add_argument("--mode", default="surgeryv2", choices=("surgery", "surgeryv2"))
    return run_main(p, run, argv)


def run(args) -> dict:
    config = load_config(args)
    fractions = sorted(set(parse_list(args.fractions, float, "--fractions")))
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise UserError(
            f"--fractions must lie in (0, 1], e.g. 0.01,0.1,1.0; got '{args.fractions}'"
        )

    a = Analysis(NAME, args, config)
    experiment, seed = a.experiment, config.surgery.seed
    # one seeded order per task: a fraction keeps its first rows, so 1% ⊂ 10% ⊂ 100%
    orders = [
        np.random.default_rng([seed, t]).permutation(len(pool))
        for t, pool in enumerate(experiment.unlabeled)
    ]
    rows = []
    for fraction in fractions:
        unlabeled, targets, sizes = [], [], {}
        for t, pool in enumerate(experiment.unlabeled):
            keep = np.sort(orders[t][: max(1, round(len(pool) * fraction))])
            unlabeled.append([pool[i] for i in keep])
            targets.append(experiment.train_targets[t].take(torch.as_tensor(keep)))
            sizes[a.names[t]] = len(keep)
        model, result = a.surgery(args.mode, unlabeled=unlabeled, targets=targets)
        label = f"{MODE_LABELS[args.mode]} {fraction:g}"
        rows.append(
            {
                **a.test(model, label),
                "fraction": fraction,
                "unlabeled_rows": sizes,
                "gap_closure": a.gap_closure(label),
                "seconds_per_iteration": round(result.seconds_per_iteration, 4),
                "loss_last": result.losses[-1] if result.losses else None,
            }
        )

    summary = (
        f"{config.name}: {MODE_LABELS[args.mode]} with "
        + ", ".join(f"{100 * r['fraction']:g}% unlabeled {pm(r)}" for r in rows)
        + f"; {a.reference_text()}"
    )
    data = a.result(
        mode=args.mode,
        fractions=fractions,
        pool_rows={n: len(p) for n, p in zip(a.names, experiment.unlabeled)},
        rows=rows,
        summary=summary,
    )

    def draw(ax):
        ax.plot(
            [100 * r["fraction"] for r in rows],
            [100 * r["avg"] for r in rows],
            marker="o",
            label=MODE_LABELS[args.mode],
        )
        a.references(ax)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel(f"unlabeled data used (of '{config.surgery.unlabeled}')")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(a.title(f"accuracy vs unlabeled data, {a.iterations} iterations"))

    a.write(data, draw)
    print_table(
        ["fraction", "rows/task", "s/it", *a.names, "avg", "gap closed"],
        [
            [
                f"{100 * r['fraction']:g}%",
                "/".join(str(n) for n in r["unlabeled_rows"].values()),
                r["seconds_per_iteration"],
                *(pm(r, t) for t in a.names),
                pm(r),
                closure_text(r["gap_closure"]),
            ]
            for r in rows
        ],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
