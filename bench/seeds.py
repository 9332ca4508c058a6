"""One config run with several seeds: every row as mean ± sd over the seeds.

    python -m bench.seeds --config dinov2-bench [--seeds 0,1,2] [--set KEY=VALUE ...]
        [--runs runs/seeds] [--cache DIR] [--data DIR] [--results PATH ...] [--out DIR]

Each seed is a full ``python -m trainer.fit`` run with ``--set seed=<s>``, which reseeds the
validation split, the experts' fine-tuning, the unlabeled pool and the surgery adapters (the
pretrained base stays). A seed whose ``<runs>/<config>-seed<s>/results.json`` already holds a
finished run of the same config is not run again, so an interrupted sweep resumes. Runs made
elsewhere can be added with ``--results`` (their seeds are read from the files).

For every row (``<method>/<surgery>``), the table gives the test average's mean ± sample sd
over the seeds, each seed's value with its own 95 % interval, and the gap closure
``(row - merged) / (experts - merged)`` as mean ± sd; the last column counts the seeds whose
validation-chosen bundle was that row. Writes ``<out>/seeds_<config>.json``; the last printed
line is a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import RESULTS, print_table, write_result

REPO = Path(__file__).resolve().parent.parent
EXPERTS = "individual/none"


def row_key(row: dict) -> str:
    return f"{row['method']}/{row['surgery']}"


def run_seed(
    config: str, seed: int, sets: list[str], out: Path, cache: str | None, data: str | None
) -> Path:
    """``trainer.fit`` for one seed (skipped when ``out`` holds a finished run of it)."""
    results = out / "results.json"
    if results.is_file():
        done = json.loads(results.read_text())
        if done.get("config", {}).get("seed") == seed and done.get("rows"):
            print(f"seed {seed}: {results} exists, not run again", flush=True)
            return results
    cmd = [sys.executable, "-m", "trainer.fit", "--config", config, "--out", str(out)]
    cmd += ["--set", f"seed={seed}"]
    for item in sets:
        cmd += ["--set", item]
    if cache:
        cmd += ["--cache", cache]
    if data:
        cmd += ["--data", data]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(
            f"bench.seeds: trainer.fit failed for seed {seed} (exit {proc.returncode})"
        )
    return results


def aggregate(runs: list[dict]) -> dict:
    """Mean ± sd per row over the runs (each a results.json), the rows all runs share."""
    seeds = [r["config"]["seed"] for r in runs]
    by_seed = [{row_key(row): row for row in r["rows"]} for r in runs]
    shared = [k for k in by_seed[0] if all(k in b for b in by_seed[1:])]
    tasks = [t["name"] if isinstance(t, dict) else t for t in runs[0]["tasks"]]
    rows = {}
    for key in shared:
        avgs = np.array([b[key]["avg"] for b in by_seed])
        entry = {
            "avg_mean": float(avgs.mean()),
            "avg_sd": float(avgs.std(ddof=1)) if len(avgs) > 1 else 0.0,
            "per_seed": {
                str(s): {"avg": b[key]["avg"], "ci95": b[key].get("ci95", {}).get("avg")}
                for s, b in zip(seeds, by_seed, strict=True)
            },
            "acc_mean": {t: float(np.mean([b[key]["acc"][t] for b in by_seed])) for t in tasks},
        }
        closures = [r.get("gap_closure", {}).get(key, {}).get("value") for r in runs]
        if all(c is not None for c in closures):
            entry["gap_closure_mean"] = float(np.mean(closures))
            entry["gap_closure_sd"] = float(np.std(closures, ddof=1)) if len(runs) > 1 else 0.0
            entry["gap_closure_per_seed"] = dict(zip(map(str, seeds), closures, strict=True))
        entry["chosen_by_validation"] = sum(r.get("bundle", {}).get("row") == key for r in runs)
        rows[key] = entry
    protocols = sorted({r.get("unlabeled", {}).get("protocol", "?") for r in runs})
    return {"seeds": seeds, "tasks": tasks, "protocol": "/".join(protocols), "rows": rows}


def table(summary: dict) -> tuple[list[str], list[list]]:
    header = ["row", "avg mean ± sd", "per seed (95 % CI)", "gap closure", "chosen"]
    lines = []
    for key, e in summary["rows"].items():
        per = ", ".join(
            f"{100 * v['avg']:.1f}"
            + (f" [{100 * v['ci95'][0]:.1f}, {100 * v['ci95'][1]:.1f}]" if v["ci95"] else "")
            for v in e["per_seed"].values()
        )
        closure = (
            f"{100 * e['gap_closure_mean']:.0f} ± {100 * e['gap_closure_sd']:.0f} %"
            if "gap_closure_mean" in e
            else ""
        )
        mean = f"{100 * e['avg_mean']:.2f} ± {100 * e['avg_sd']:.2f}"
        chosen = f"{e['chosen_by_validation']}/{len(summary['seeds'])}"
        lines.append([key, mean, per, closure, chosen])
    return header, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__)
    p.add_argument("--config", default="dinov2-bench", help="a shipped config name or a TOML")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds to run")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "seeds", help="run folders")
    p.add_argument("--cache", default=None, help="trainer.fit's cache folder")
    p.add_argument("--data", default=None, help="trainer.fit's root for {data} in config paths")
    p.add_argument("--results", type=Path, nargs="*", default=[], help="finished runs to add")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if any(item.split("=", 1)[0].strip() == "seed" for item in args.set):
        p.error("--set seed=... is what --seeds varies; give the seeds with --seeds")
    for path in args.results:
        if not path.is_file():
            p.error(f"--results {path}: no such file (a run's results.json)")
    name = Path(args.config).stem
    files = list(args.results)
    for seed in seeds:
        files.append(
            run_seed(
                args.config, seed, args.set, args.runs / f"{name}-seed{seed}", args.cache, args.data
            )
        )
    runs = [json.loads(f.read_text()) for f in files]
    suites = sorted({r.get("suite", "?") for r in runs})
    if len(suites) > 1:
        p.error(f"the runs are of different suites ({', '.join(suites)}); one config per sweep")
    found = [r["config"]["seed"] for r in runs]
    if len(set(found)) != len(found):
        p.error(f"two runs share a seed ({found}); each seed once")
    summary = aggregate(runs) | {"config": name, "sets": args.set, "files": [str(f) for f in files]}
    header, lines = table(summary)
    # the row validation chose most often (never the best test mean: that would be a choice
    # made on test rows)
    chosen = max(
        (k for k, e in summary["rows"].items() if e["chosen_by_validation"]),
        key=lambda k: summary["rows"][k]["chosen_by_validation"],
        default=None,
    )
    experts = summary["rows"].get(EXPERTS)
    text = f"seeds ({name}, {summary['protocol']}, seeds {','.join(map(str, found))}): "
    if experts is not None:
        text += f"experts {100 * experts['avg_mean']:.2f} ± {100 * experts['avg_sd']:.2f}"
    if chosen is not None:
        c = summary["rows"][chosen]
        text += (
            f"; validation chose {chosen} in {c['chosen_by_validation']} of {len(runs)}: "
            f"{100 * c['avg_mean']:.2f} ± {100 * c['avg_sd']:.2f}"
        )
        if "gap_closure_mean" in c:
            text += (
                f", gap closure {100 * c['gap_closure_mean']:.0f} ± "
                f"{100 * c['gap_closure_sd']:.0f} %"
            )
    path = write_result(f"seeds_{name}", summary, args.out)
    print(f"wrote {path}")
    print_table(header, lines, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
