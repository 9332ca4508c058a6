"""Accuracy against the cost of a `*` request, as the SurgeryV2 branch block k moves.

    python -m bench.branch_sweep [--config text-bench] [--ks 0,1,...] [--iterations N]
        [--eval-limit 500] [--requests 200] [--clients 16] [--no-serve] [--models DIR]

SurgeryV2 puts a task's adapter after every block; with branch block k only blocks k+1..L
carry adapters, so blocks 1..k are the same for every task and a `*` request (every task on
one input) runs them once: it costs k/L of a backbone pass once plus (L-k)/L per task
(k = 0: the paper's SurgeryV2, T passes; k = L: Surgery, one pass plus T heads). For each k,
fresh adapters are trained on the task-arithmetic merge (``--iterations`` each, as the other
analyses), scored on the same ``--eval-limit`` test rows per task, written as a bundle,
exported (``python -m export.onnx``, fp32, adapter form auto) and served by runtime.server:
closed-loop throughput of `*` requests and of single-task requests from ``--clients``
clients, ``--rounds`` alternating pairs. The relative `*` cost is single-task req/s / `*`
req/s (median of the pairs): what a `*` costs in single-task requests on the same server
(expected k/L + T(L-k)/L passes). Gap closure = (avg - merged) / (experts - merged). The knee
is the point furthest above the chord from the cheapest to the costliest end (accuracy and
expected cost normalised between the two ends: Kneedle's criterion) on the VALIDATION
averages, as is the cheapest k within 0.5 points of the best; the test columns (each with its
95 % interval) draw the curve and are not used for either choice. A Surgery row (the
adapter on the final representation only, trained the same way: the paper's baseline, the
same graph shape as k = L) is added unless ``--no-surgery``. Writes
<out>/branch_sweep_<config>.json and .png; the last printed line is a one-line summary.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from bench.analysis import METHOD, Analysis, load_config, parse_list, parser, pct, pm, run_main
from bench.common import print_table
from bench.serving_load import LoadSpec, ServerProcess, model_inputs, run_load
from export.onnx import export
from trainer.errors import UserError
from trainer.results.bundle import write_bundle


def main(argv=None) -> int:
    p = parser("bench.branch_sweep", __doc__)
    p.add_argument("--ks", default="", help="branch blocks to try (default: every k, 0..L)")
    p.add_argument("--requests", type=int, default=200, help="served requests per load")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of each load")
    p.add_argument("--rounds", type=int, default=3, help="alternating `*`/single-task loads")
    p.add_argument("--threads", type=int, default=0, help="server --intra-op-threads (0: auto)")
    p.add_argument("--no-serve", action="store_true", help="skip export and serving")
    p.add_argument("--models", default="", help="bundles and model dirs (default runs/...)")
    p.add_argument(
        "--no-surgery", action="store_true", help="skip the Surgery (last layer only) reference row"
    )
    return run_main(p, run, argv)


def served_throughput(model_dir: Path, args) -> dict:
    """Closed-loop req/s of `*` requests and of single-task requests (uniform over tasks), in
    ``--rounds`` alternating pairs; the relative cost is the median of the pairs' ratios."""
    from runtime.manifest import load_model_dir

    spec = load_model_dir(model_dir)
    field, inputs = model_inputs(spec.manifest)
    tasks = [t.name for t in spec.tasks]
    flags = ["--providers", "cpu", "--intra-op-threads", str(args.threads)]
    server = ServerProcess(model_dir, *flags)
    rps = {"star": [], "single": []}
    try:
        routes = {k: [server.addr] for k in [*tasks, "*"]}
        for r in range(args.rounds):
            order = (("star", ["*"]), ("single", tasks))
            for name, kinds in order if r % 2 == 0 else reversed(order):
                result = run_load(
                    LoadSpec(
                        routes=routes,
                        kinds=kinds,
                        field=field,
                        inputs=inputs,
                        requests=args.requests,
                        clients=args.clients,
                        warmup=min(50, args.requests // 4),
                    )
                )
                if result.errors:
                    raise UserError(f"{model_dir}: {result.errors} failed requests while serving")
                rps[name].append(round(result.requests / result.seconds, 2))
    finally:
        server.stop()
    ratios = [s / t for s, t in zip(rps["single"], rps["star"], strict=True)]
    return {
        "star_rps": statistics.median(rps["star"]),
        "single_rps": statistics.median(rps["single"]),
        "rounds_rps": rps,
        "relative_star_cost": round(statistics.median(ratios), 3),
    }


def closure(entry: dict) -> str:
    """Gap closure as a percentage with its 95 % paired-bootstrap interval ('n/a' when the
    merge lost nothing to close)."""
    if entry["gap_closure"] is None:
        return "n/a"
    ci = entry.get("gap_closure_ci95")
    interval = "" if ci is None else f" [{ci[0]:.0%}, {ci[1]:.0%}]"
    return f"{entry['gap_closure']:.0%}{interval}"


def knee(
    points: list[dict], cost: str = "expected_star_passes", score: str = "validation_avg"
) -> dict:
    """The point furthest above the chord joining the cheapest and the costliest point, with
    ``cost`` and ``score`` (the validation average: a choice is never made on test)
    normalised between them (Kneedle's criterion)."""
    ordered = sorted(points, key=lambda r: r[cost])
    first, last = ordered[0], ordered[-1]
    span_x = (last[cost] - first[cost]) or 1.0
    span_y = (last[score] - first[score]) or 1.0
    return max(
        ordered,
        key=lambda r: (r[score] - first[score]) / span_y - (r[cost] - first[cost]) / span_x,
    )


def run(args) -> dict:
    config = load_config(args)
    a = Analysis(f"branch_sweep_{config.name}", args, config)
    blocks = a.experiment.base.num_blocks
    tasks = len(a.names)
    ks = sorted(set(parse_list(args.ks, int, "--ks"))) if args.ks else list(range(blocks + 1))
    if any(not 0 <= k <= blocks for k in ks):
        raise UserError(f"--ks must be in 0..{blocks} (the backbone's blocks), got '{args.ks}'")
    models = Path(args.models or Path("runs") / "branch_sweep" / config.name)
    gap = a.individual["avg"] - a.merged["avg"]
    rows = []
    runs = [("surgeryv2", k) for k in ks] + ([] if args.no_surgery else [("surgery", blocks)])
    for mode, k in runs:
        model = a.experiment.model(a.merged_state, mode, branch_block=k)
        result = a.experiment.surgery(model, iterations=a.iterations)
        label = f"SurgeryV2 k={k}" if mode == "surgeryv2" else "Surgery"
        validation = a.validate(model, label)
        scored = a.test(model, label)
        entry = {
            **scored,
            "validation_avg": validation["avg"],
            "validation": validation,
            "mode": mode,
            "branch_block": k,
            "gap_closure": (scored["avg"] - a.merged["avg"]) / gap if gap > 0 else None,
            "gap_closure_ci95": a.gap_closure(label)["ci95"],
            "adapter_params_per_task": sum(p.numel() for p in model.adapter_parameters()) // tasks,
            "seconds_per_iteration": round(result.seconds_per_iteration, 4),
            "expected_star_passes": round((k + tasks * (blocks - k)) / blocks, 3),
        }
        if not args.no_serve:
            name = f"k{k}" if mode == "surgeryv2" else "surgery"
            bundle = models / name / "bundle"
            info = {"suite": config.name, "merge": {"method": METHOD}, "accuracy": scored}
            write_bundle(bundle, model.cpu(), [t.classes for t in a.experiment.tasks], info)
            onnx_dir = models / name / "onnx"  # the model dir (export returns its graph file)
            manifest, _ = export(bundle, onnx_dir, force=True)
            entry["model_dir"] = str(onnx_dir)
            entry["adapter_form"] = manifest["adapter_form"]
            entry["load_before"] = [round(x, 2) for x in os.getloadavg()]
            entry |= served_throughput(onnx_dir, args)
            entry["load_after"] = [round(x, 2) for x in os.getloadavg()]
        entry["cost"] = entry.get("relative_star_cost", entry["expected_star_passes"])
        rows.append(entry)
        del model
    surgery = [r for r in rows if r["mode"] == "surgery"]
    rows = [r for r in rows if r["mode"] == "surgeryv2"]

    # the knee on the expected cost: the measured one is noisy on a shared machine and the
    # frontier's shape is set by accuracy; both costs are reported and plotted. Both choices
    # read the VALIDATION averages; the test numbers are reported for the curve only
    best = knee(rows)
    top = max(x["validation_avg"] for x in rows)
    within = [r for r in rows if r["validation_avg"] >= top - 0.005]
    cheapest = min(within, key=lambda r: r["expected_star_passes"])
    cost_kind = "measured" if not args.no_serve else "expected"
    summary = (
        f"{config.name}: branch-point knee at k={best['branch_block']} of {blocks}, chosen on "
        f"{a.criterion} (test avg {pm(best)}, gap closure {closure(best)}, `*` cost "
        f"{best['expected_star_passes']:.2f} passes expected, {best['cost']:.2f} single "
        f"requests {cost_kind}); cheapest k within 0.5 validation points of the best: "
        f"k={cheapest['branch_block']} ({pct(cheapest['avg'])}, "
        f"{cheapest['expected_star_passes']:.2f} passes); k={rows[0]['branch_block']} "
        f"{pct(rows[0]['avg'])} at {rows[0]['expected_star_passes']:.2f}; "
        f"{a.reference_text()}"
    )
    if surgery:
        summary += f"; Surgery (last layer) {pct(surgery[0]['avg'])}"
    data = a.result(
        blocks=blocks,
        ks=ks,
        rows=rows,
        surgery=surgery[0] if surgery else None,
        knee=best["branch_block"],
        cheapest_within_half_point=cheapest["branch_block"],
        cost=f"{cost_kind}: single-task req/s / `*` req/s on runtime.server",
        knee_on="expected_star_passes",
        chosen_by=f"validation average ({a.criterion}); test reported, not used",
        serve={
            "requests": args.requests,
            "clients": args.clients,
            "rounds": args.rounds,
            "threads": args.threads,
        },
        summary=summary,
    )

    def draw(ax):
        xs = [r["cost"] for r in rows]
        ys = [100 * r["avg"] for r in rows]
        ax.plot(xs, ys, marker="o", label="SurgeryV2, adapters after blocks k+1..L")
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"k={r['branch_block']}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.plot(
            [best["cost"]],
            [100 * best["avg"]],
            "r*",
            markersize=14,
            label=f"knee k={best['branch_block']}",
        )
        a.references(ax)
        ax.set_xlabel(f"relative cost of a `*` request ({cost_kind}, single-task requests)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(
            a.title(f"branch block sweep, {a.iterations} iterations, T={tasks}"), fontsize=10
        )

    a.write(data, draw)
    header = ["k", "val avg", *a.names, "test avg", "gap closed", "params/task"]
    header += ["* passes", "* cost"]
    if not args.no_serve:
        header += ["* req/s", "single req/s", "form"]
    print_table(
        header,
        [
            [
                r["branch_block"] if r["mode"] == "surgeryv2" else "Surgery",
                pct(r["validation_avg"]),
                *(pm(r, t) for t in a.names),
                pm(r),
                closure(r),
                r["adapter_params_per_task"],
                f"{r['expected_star_passes']:.2f}",
                f"{r['cost']:.2f}",
                *(
                    []
                    if args.no_serve
                    else [r["star_rps"], r["single_rps"], r["adapter_form"]["form"]]
                ),
            ]
            for r in rows + surgery
        ],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
