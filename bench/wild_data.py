"""Surgery on unlabeled data that is not the task's own (the paper's Table IV, "wild" data).

    python -m bench.wild_data [--config text-bench] [--sources agnews,amazon,...]
        [--wild PATH ...] [--wild-limit 1000] [--mode surgeryv2] [--iterations N]
    python -m bench.wild_data --config vision-bench --wild {data}/images/cifar10.npz

Rows, each a fresh SurgeryV2 on task arithmetic scored on the same test rows:
  test          every task's adapters learn from its own test inputs (the reference)
  task:<name>   every task's adapters learn from task <name>'s test inputs; for task <name>
                itself that is its own data, so the row is marked as partly in-domain
  wild:<stem>   every task's adapters learn from the inputs of a file or folder (--wild)
Each task's targets are its own expert's representations of the pool (capped at --wild-limit
seeded rows), so no labels are used anywhere. ``--sources`` defaults to every task when no
``--wild`` is given and to none otherwise; ``--sources ''`` runs the wild rows alone.
Nothing is chosen: every row is a test score with its 95 % interval, and each other source is
compared with the own pool by a paired test on the same test rows ("beats" / "below" / "ties
within noise").
"""

from __future__ import annotations

import sys

import torch

from bench.analysis import (
    MODE_LABELS,
    Analysis,
    data_root,
    load_config,
    parse_list,
    parser,
    pm,
    run_main,
    subset,
)
from bench.common import print_table
from trainer.data.tasks import resolve_path
from trainer.data.unlabeled import read_wild
from trainer.errors import UserError

NAME = "wild_data"


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__)
    p.add_argument(
        "--sources",
        default=None,
        help="tasks whose test inputs every task learns from (default: all, unless --wild)",
    )
    p.add_argument(
        "--wild",
        action="append",
        default=[],
        metavar="PATH",
        help="a file or folder of wild inputs ({data} allowed), one row each (repeatable)",
    )
    p.add_argument(
        "--wild-limit",
        type=int,
        default=1000,
        help="seeded rows kept of each wild pool (0 = all)",
    )
    p.add_argument("--mode", default="surgeryv2", choices=("surgery", "surgeryv2"))
    return run_main(p, run, argv)


def read_wild_pools(args, config) -> dict[str, list]:
    """``wild:<stem>`` -> its inputs, every path checked (and the modality) before any work."""
    pools = {}
    for text in args.wild:
        path = resolve_path(text, data_root(args))
        if not path.exists():
            raise UserError(
                f"--wild {text}: {path} does not exist (expected a text/jsonl file, a task "
                "folder, an .npz or a folder of images)"
            )
        items = read_wild(path)
        wants_text = config.backbone.kind == "hf_text"
        if isinstance(items[0], str) != wants_text:
            raise UserError(
                f"--wild {text}: holds {'texts' if isinstance(items[0], str) else 'images'} but "
                f"backbone '{config.backbone.kind}' reads {'text' if wants_text else 'images'}"
            )
        label = f"wild:{path.stem}"
        if label in pools:
            raise UserError(f"--wild: two paths are named '{path.stem}'; rename one")
        pools[label] = items
    return pools


def run(args) -> dict:
    config = load_config(args)
    if args.wild_limit < 0:
        raise UserError(f"--wild-limit must be >= 0 (0 = all rows), got {args.wild_limit}")
    if args.sources is None:
        sources = None if not args.wild else []  # None: every task, known once tasks are loaded
    else:
        sources = parse_list(args.sources, str, "--sources")
    known = [t.name for t in config.tasks]
    if known and sources:
        _check_sources(sources, known)
    wild = read_wild_pools(args, config)

    a = Analysis(NAME, args, config)
    experiment, seed, limit = a.experiment, config.surgery.seed, args.wild_limit
    sources = list(a.names) if sources is None else sources
    _check_sources(sources, a.names)

    # ---- the rows: (label, kind, the task it is in-domain for, pool, targets already known) --
    plans = [(config.surgery.unlabeled, "own", None, None, None)]
    for name in sources:
        s = a.names.index(name)
        inputs = experiment.tasks[s].test.inputs
        keep = subset(len(inputs), limit or len(inputs), seed)
        pool = [inputs[i] for i in keep]
        own = {s: experiment.test_targets[s].take(torch.as_tensor(keep))}  # already computed
        plans.append((f"task:{name}", "task", name, pool, own))
    for label, items in wild.items():
        keep = subset(len(items), limit or len(items), seed)
        plans.append((label, "wild", None, [items[i] for i in keep], None))

    rows = []
    for label, kind, in_domain, pool, known_targets in plans:
        if pool is None:  # the config's own unlabeled data and targets
            unlabeled, targets = None, None
            sizes = {n: len(u) for n, u in zip(a.names, experiment.unlabeled)}
        else:
            targets = a.expert_targets(pool, label, skip=known_targets)
            unlabeled = [pool] * len(a.names)
            sizes = {n: len(pool) for n in a.names}
        model, result = a.surgery(args.mode, unlabeled=unlabeled, targets=targets)
        name = f"{MODE_LABELS[args.mode]} {label}"
        rows.append(
            {
                **a.test(model, name),
                "source": label,
                "kind": kind,
                "in_domain_for": in_domain,
                "unlabeled_rows": sizes,
                "seconds_per_iteration": round(result.seconds_per_iteration, 4),
                "loss_last": result.losses[-1] if result.losses else None,
            }
        )
        if len(rows) == 1:
            own_label = name
        else:  # every other source against the own pool, on the same test rows
            rows[-1]["vs_own"] = a.compare(name, own_label)

    own = rows[0]
    others = rows[1:]
    summary = f"{config.name}: {MODE_LABELS[args.mode]} on its own pool {pm(own)}"
    if others:
        worst = min(others, key=lambda r: r["avg"])
        best = max(others, key=lambda r: r["avg"])
        summary += (
            f", on other data {pm(worst)} ({worst['source']}) to {pm(best)} ({best['source']}); "
            + ", ".join(f"{r['source']} {r['vs_own']['verdict']} own" for r in others)
        )
    summary += f"; {a.reference_text()}"
    data = a.result(
        mode=args.mode,
        wild_limit=limit,
        sources=[r["source"] for r in rows],
        rows=rows,
        summary=summary,
    )

    def draw(ax):
        labels = [_label(r) for r in rows]
        colours = [
            "tab:green"
            if r["kind"] == "own"
            else "tab:blue"
            if r["kind"] == "task"
            else "tab:orange"
            for r in rows
        ]
        ax.bar(
            range(len(rows)),
            [100 * r["avg"] for r in rows],
            color=colours,
            label=f"{MODE_LABELS[args.mode]} on this unlabeled data",
        )
        a.references(ax)
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        low = min([100 * r["avg"] for r in rows] + [100 * a.merged["avg"]])
        ax.set_ylim(max(0.0, low - 10), 100)
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(a.title(f"unlabeled data source, {a.iterations} iterations"))

    a.write(data, draw)
    print_table(
        ["unlabeled source", "rows", "s/it", *a.names, "avg", "vs own (paired)"],
        [
            [
                _label(r),
                max(r["unlabeled_rows"].values()),
                r["seconds_per_iteration"],
                *(pm(r, t) for t in a.names),
                pm(r),
                r["vs_own"]["verdict"] if "vs_own" in r else "",
            ]
            for r in rows
        ],
        summary,
    )
    return data


def _label(r: dict) -> str:
    return f"{r['source']} (own for {r['in_domain_for']})" if r["in_domain_for"] else r["source"]


def _check_sources(sources: list[str], names: list[str]) -> None:
    for name in sources:
        if name not in names:
            raise UserError(f"--sources: no task named '{name}'; tasks: {', '.join(names)}")


if __name__ == "__main__":
    sys.exit(main())
