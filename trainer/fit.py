"""``python -m trainer.fit``: experts -> merged backbone -> surgery -> evaluation -> bundle.

Reads top to bottom like a training script: load and validate everything first (so a bad
input fails before any work and nothing is half-written), then build the experts, then one row
per merge method × surgery mode, then write results.json, the bias plot, the table and the
bundle. The machinery lives in ``trainer.pipeline`` (the shared :class:`Experiment`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import run_cli
from .pipeline import prepare, resolve_device
from .progress import quiet_libraries
from .results.bundle import sample_inputs, write_bundle
from .results.predictions import FILE as CORRECT_FILE
from .results.predictions import test_rows_record, write_correct
from .results.report import (
    format_table,
    interval_footnote,
    paired_statistics,
    plot_bias,
    protocol_line,
    results_row,
    row_key,
    search_footnote,
    summary_line,
    write_results,
)

log = logging.getLogger("deepsurgery")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.fit", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default="demo",
        help="a shipped config name (demo, text-bench, vision-bench) or a TOML file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set finetune.steps=100",
    )
    p.add_argument(
        "--data",
        default=None,
        help="root for {data} in config paths (env DEEPSURGERY_DATA, else ../shared/data)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder for experts and targets (env DEEPSURGERY_CACHE, else runs/cache)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    return run_cli(lambda: run(args))[0]


def run(args: argparse.Namespace) -> dict:
    config = load_config(args.config, args.set)
    data_root = Path(
        args.data
        or os.environ.get("DEEPSURGERY_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    cache = Path(args.cache or os.environ.get("DEEPSURGERY_CACHE") or "runs/cache")
    out = Path(args.out or f"runs/{config.name}")
    return fit(config, data_root=data_root, cache=cache, out=out, device=args.device)


def fit(config: Config, *, data_root: Path, cache: Path, out: Path, device: str = "auto") -> dict:
    # ---- 1-3. inputs, experts and their representations (trainer.pipeline) ----------------
    exp = prepare(config, data_root=data_root, cache=cache, device=resolve_device(device))
    individual = exp.individual_accuracy()
    rows = [results_row("individual", "none", individual)]
    correct = {row_key(rows[0]): individual.correct}  # per row, per task: bool [N] on test
    if config.multitask.enabled:
        multitask = exp.evaluate(exp.multitask_model(), "multitask")
        rows.append(results_row("multitask", "none", multitask))
        correct[row_key(rows[-1])] = multitask.correct
        exp.lap("multitask")

    # ---- 4. every merge method × surgery mode -------------------------------------------------
    sc = config.surgery
    surgered = sc.methods or config.merge.methods
    bias: dict[str, list[float]] = {}
    surgery_stats: dict[str, dict] = {}
    best = None  # (row, model, hparams) of the row the bundle will hold
    # every merged row is scored on the validation rows (a single row needs no choosing):
    # output.bundle = "best" ships the highest, never a row chosen on test
    scoring = len(config.merged_rows()) > 1
    selecting = scoring and config.output.bundle == "best"
    bundle_scores: dict[str, float] = {}
    chosen: dict[str, dict] = {}  # method -> the hyper-parameters it used, and its search
    for method in config.merge.methods:
        merged, hparams = exp.merged(method)
        search = exp.searches.get(method)
        chosen[method] = {
            "hparams": hparams,
            "search": None
            if search is None
            else {"criterion": exp.validation.criterion, **search.to_json()},
        }
        if method in exp.learned:
            chosen[method]["learned"] = exp.learned[method]
        exp.lap("merge")
        for mode in sc.modes:
            if mode != "none" and method not in surgered:
                continue
            model = exp.model(merged, mode)  # owns its weights: later rows cannot change it
            if mode != "none":
                result = exp.surgery(model)
                surgery_stats[f"{method}/{mode}"] = {
                    "seconds_per_iteration": round(result.seconds_per_iteration, 4),
                    "loss_first": result.losses[0] if result.losses else None,
                    "loss_last": result.losses[-1] if result.losses else None,
                }
                exp.lap("surgery")
            evaluation = exp.evaluate(model, f"{method}/{mode}")
            bias[f"{method}/{mode}"] = evaluation.bias
            rows.append(results_row(method, mode, evaluation))
            correct[row_key(rows[-1])] = evaluation.correct
            exp.lap("eval")
            key = f"{method}/{mode}"
            if scoring:
                bundle_scores[key] = exp.validation_score(model, key)
                exp.lap("select")
            if selecting:
                # a tie keeps the earlier row: the plain merge before its surgery
                if bundle_scores[key] > max([*bundle_scores.values()][:-1], default=-1.0):
                    best = (rows[-1], model, hparams)
            elif config.output.bundle in (key, "best"):  # named, or the only merged row
                best = (rows[-1], model, hparams)

    # ---- 5. outputs: the bias plot, the bundle, results.json, the table ----------------------
    out.mkdir(parents=True, exist_ok=True)
    plot_bias(out / "bias.png", bias, config.name)
    # which row ships and why: chosen on validation (or agreement), or named by the config
    bundle = None
    if best is not None:
        bundle = {
            "row": f"{best[0]['method']}/{best[0]['surgery']}",
            "criterion": exp.bundle_criterion()
            if selecting
            else ("config" if config.output.bundle != "best" else "only row"),
            # every merged row's validation score, whatever chose the row
            "scores": bundle_scores,
        }
    unlabeled = None if exp.pool is None else exp.pool.record(exp.names)
    if best is not None:
        row, model, hparams = best
        merge_info = {"method": row["method"], "hparams": hparams}  # the values it used
        if row["method"] in exp.searches:
            merge_info["searched"] = exp.searches[row["method"]].searched
            merge_info["criterion"] = exp.validation.criterion
        info = {
            "suite": config.name,
            "merge": merge_info,
            "accuracy": row,
            "bundle": bundle,
            "unlabeled": None
            if unlabeled is None
            else {k: unlabeled[k] for k in ("protocol", "source", "rows")},
        }
        pools = [
            pool if pool is not None and len(pool) else task.test.inputs
            for pool, task in zip(exp.unlabeled or [None] * len(exp.tasks), exp.tasks, strict=True)
        ]
        samples = sample_inputs(pools, config.seed)
        write_bundle(out / "bundle", model.cpu(), [t.classes for t in exp.tasks], info, samples)
        exp.lap("bundle")
    results = {
        "suite": config.name,
        "backbone": exp.base.spec(),
        "pretrain": exp.pretrain,
        "tasks": exp.names,
        "no_labels": [t.name for t in exp.tasks if not t.labelled],  # their acc is null
        "rows": rows,
        "merge": chosen,
        "validation": exp.validation_record(),
        "unlabeled": unlabeled,
        "bundle": bundle,
        "bias": bias,
        "surgery": surgery_stats,
        "timing_s": exp.timing,
        "device": str(exp.device),
        "config": config.to_dict(),
    }
    # gap closure and the paired test vs the experts, the compared row chosen on validation
    results |= paired_statistics(rows, correct, config.seed, results.get("bundle"))
    # every row's per-row correctness, so another run on the same test rows can be paired
    # with this one later (python -m bench.pair_runs)
    results["test_rows"] = test_rows_record(exp.tasks)
    write_correct(out / CORRECT_FILE, correct)
    write_results(out / "results.json", results)
    print(format_table(exp.names, rows))
    print(interval_footnote())
    protocol = protocol_line(results.get("unlabeled"))  # which inputs surgery learned from
    if protocol:
        print(protocol)
    if exp.searches:
        print(search_footnote(exp.searches, exp.validation, exp.validation_notes()))
    if best is None:
        print(f"{config.name}: no merged rows (merge.methods is empty); results in {out}")
    else:
        summary = summary_line(config.name, rows, results)
        print(
            (summary + "; " if summary else "")
            + f"bundle row {bundle['row']} (by {bundle['criterion']}) "
            f"avg {_percent(best[0]['avg'])} vs individual {_percent(rows[0]['avg'])}; "
            + ("" if exp.pool is None else f"unlabeled pool {exp.pool.describe()}; ")
            + f"{sum(exp.timing.values()):.0f} s on {exp.device}"
        )
    return results


def _percent(value: float | None) -> str:
    return "no labels" if value is None else f"{100 * value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
