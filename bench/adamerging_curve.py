"""Why AdaMerging collapsed: every task's accuracy against its head's entropy along
AdaMerging's iterations, for the paper's objective and the shipped one.

    python -m bench.adamerging_curve [--config demo] [--iterations 60] [--every 5]
        [--lr 1e-3] [--eval-limit 300] [--recipes paper,shipped]

Both start from a task arithmetic merge and draw the same batches:

- paper: from λ = 0.3, the mean entropy of the heads' raw logits, nothing else; the guard
  watches (its margin set to 1) but never stops it
- shipped: the config's ``[merge.adamerging]`` with the method's defaults (the start its
  label-free search picks, class prior, logits normalised by their spread, the guard);
  ``--set merge.adamerging.init=0.6 --set merge.adamerging.init_search=false`` starts it at
  a given λ instead

At iteration 0 and every ``--every`` iterations, on the same seeded test rows per task: the
accuracy (labels are read here: this is a diagnosis, not a method), the mean entropy of the
head's raw logits, and the share of its predictions falling in its most frequent class. A
curve that keeps its entropy while its accuracy falls, or whose majority share climbs to
100 %, is the collapse.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch

from bench.analysis import Analysis, load_config, parse_list, parser, pct, run_main
from bench.common import print_table
from trainer.errors import UserError
from trainer.merging import MergeContext, get_method
from trainer.merging.adamerging import adamerging
from trainer.surgery.features import final_features

NAME = "adamerging_curve"
PAPER = {
    "init": 0.3,
    "init_search": False,
    "diversity": 0.0,
    "normalize_logits": False,
    "guard_margin": 1.0,
}


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__)
    p.set_defaults(config="demo", eval_limit=300)
    p.add_argument("--every", type=int, default=5, help="score every N iterations")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: the config's)")
    p.add_argument(
        "--recipes",
        default="paper,shipped",
        help="which curves to draw, comma-separated (e.g. only 'shipped' when comparing starts)",
    )
    return run_main(p, run, argv)


def run(args) -> dict:
    config = load_config(args)
    if args.every < 1:
        raise UserError(f"--every must be >= 1, got {args.every}")
    method = get_method("adamerging")
    table = config.merge.params.get("adamerging", {})
    shipped = method.hparams(table, "merge.adamerging")
    shipped.update(guard_every=args.every)
    if args.iterations is not None:
        shipped["iterations"] = args.iterations
    if args.lr is not None:
        shipped["lr"] = args.lr
    known = {"paper": {**shipped, **PAPER}, "shipped": shipped}
    chosen = parse_list(args.recipes, str, "--recipes")
    unknown = [r for r in chosen if r not in known]
    if unknown or not chosen:
        raise UserError(
            f"--recipes: {', '.join(map(repr, unknown)) or 'none given'}; "
            f"choose from {', '.join(known)}"
        )
    recipes = {r: known[r] for r in dict.fromkeys(chosen)}

    a = Analysis(NAME, args, config)
    exp = a.experiment
    rows = a.eval_rows or [np.arange(len(t.test)) for t in exp.tasks]
    inputs = [[t.test.inputs[i] for i in r] for t, r in zip(exp.tasks, rows)]
    labels = [torch.as_tensor(np.asarray(t.test.labels)[r]) for t, r in zip(exp.tasks, rows)]

    def measure(state) -> dict:
        finals = final_features(exp.backbone(state), inputs, exp.device, exp.names)
        out = {"acc": {}, "entropy": {}, "majority": {}}
        for t, (name, final) in enumerate(zip(exp.names, finals)):
            with torch.no_grad():
                ids = torch.full((len(final),), t, dtype=torch.long, device=exp.device)
                logits = exp.heads(final.to(exp.device), ids)[:, : exp.heads.num_classes[t]]
                logits = logits.float().cpu()
            pred = logits.argmax(-1)
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
            out["acc"][name] = (pred == labels[t]).float().mean().item()
            out["entropy"][name] = entropy.item()
            out["majority"][name] = torch.bincount(pred).max().item() / len(pred)
        out["avg"] = float(np.mean(list(out["acc"].values())))
        return out

    curves, guards = {}, {}
    for recipe, hparams in recipes.items():
        points = []

        def record(it, state, points=points):
            points.append({"iteration": it, **measure(state)})

        context = MergeContext(
            exp.backbone(exp.base_state),
            copy.deepcopy(exp.heads),
            exp.unlabeled,
            exp.device,
            config.seed,
            names=exp.names,
        )
        experts = [e.state for e in exp.experts]
        adamerging(exp.base_state, experts, context=context, callback=record, **hparams)
        curves[recipe] = points
        guard = context.extra["adamerging"]
        guards[recipe] = {
            k: guard.get(k) for k in ("init", "kept", "stopped", "agreement", "start")
        }
        guards[recipe]["history"] = guard["history"]

    def describe(recipe: str) -> str:
        points, guard = curves[recipe], guards[recipe]
        text = (
            f"{recipe} {pct(points[0]['avg'])} -> {pct(points[-1]['avg'])} at iteration "
            f"{points[-1]['iteration']}"
        )
        if recipe == "paper":  # its guard never stops and nothing kept is used
            return text
        kept = next(p for p in points if p["iteration"] == guard["kept"])
        stopped = "" if guard["stopped"] is None else f" (guard stopped at {guard['stopped']})"
        return f"{text}{stopped}, kept iteration {guard['kept']}: {pct(kept['avg'])}"

    summary = f"{config.name}: " + "; ".join(describe(r) for r in recipes)
    data = a.result(
        hparams=recipes,
        curves=curves,
        guard=guards,
        summary=summary,
    )

    def draw(ax):
        plot_curves(ax, data, config.name)

    a.write(data, draw)
    names = exp.names
    print_table(
        ["recipe", "iteration", *names, "avg", *(f"H {n}" for n in names)],
        [
            [
                r,
                p["iteration"],
                *(pct(p["acc"][n]) for n in names),
                pct(p["avg"]),
                *(round(p["entropy"][n], 3) for n in names),
            ]
            for r in recipes
            for p in curves[r]
        ],
        summary,
    )
    return data


def plot_curves(ax, data: dict, name: str) -> None:
    """Accuracy against the head's entropy, one colour per task: the paper's objective solid,
    the shipped one dashed; a circle at each start, a cross / square at each end."""
    styles = {
        r: look
        for r, look in {"paper": ("-", "x", "solid"), "shipped": ("--", "s", "dashed")}.items()
        if r in data["curves"]
    }
    first = next(iter(styles))
    for t, task in enumerate(data["tasks"]):
        for recipe, (line, end, _) in styles.items():
            points = data["curves"][recipe]
            xs = [p["entropy"][task] for p in points]
            ys = [100 * p["acc"][task] for p in points]
            label = task if recipe == first else None
            ax.plot(xs, ys, line, color=f"C{t}", marker=".", label=label)
            ax.plot(
                xs[:1],
                ys[:1],
                "o",
                color=f"C{t}",
                ms=7,
                mfc="none" if recipe == "shipped" else None,
            )
            ax.plot(xs[-1:], ys[-1:], end, color=f"C{t}", ms=7)
    for recipe, (line, end, look) in styles.items():
        start = data["guard"][recipe]["init"]
        steps = data["curves"][recipe][-1]["iteration"]
        label = f"{recipe} ({look}): from λ = {start:g}, {steps} steps"
        ax.plot([], [], line, color="black", marker=end, label=label)
    ax.set_xlabel("mean entropy of the task's head (raw logits)")
    ax.set_ylabel("test accuracy (%)")
    lr = data["hparams"][first]["lr"]
    ax.set_title(
        f"{name}: AdaMerging, accuracy vs entropy per task (Adam lr {lr:g}; circles: start)",
        fontsize=9,
    )


if __name__ == "__main__":
    sys.exit(main())
