"""int8 against fp32 on the CPU: accuracy on the labelled test splits, and throughput.

    python -m bench.int8 --bundle DIR [--config text-bench] [--data DIR] [--eval-limit 500]
        [--requests 400] [--clients 16] [--rounds 2] [--batch 32] [--models DIR]

The bundle is exported twice by ``python -m export.onnx`` (fp32 with the adapter form auto
picks, then int8 with the same form): int8 is onnxruntime's dynamic quantization of the
backbone's constant-weight MatMuls, adapters and heads fp32. Export has no labelled data, so
accuracy is measured here, the way the server computes it (runtime preprocessing and
runtime.engine, no torch): the same seeded ``--eval-limit`` test rows per task as the
analyses (0: the full test split), read from the config's task files under ``--data``.
Throughput, two ways, fp32 and int8 alternating so machine drift hits both:
- graph: one session.run of ``--batch`` real inputs of mixed tasks (median ms, ``--rounds``
  x 10 paired runs);
- served: runtime.server in its own process, ``--clients`` closed-loop clients, a uniform mix
  of single-task requests (req/s, median of ``--rounds`` alternating loads).
Target: >= 1.8x served throughput at <= 0.5 points average accuracy loss. Writes
bench/results/int8.json; the last printed line is a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.analysis import data_root
from bench.common import RESULTS, print_table, write_result
from bench.serving_load import LoadSpec, ServerProcess, model_inputs, run_load
from export.onnx import export
from runtime.engine import Engine
from runtime.manifest import load_model_dir
from runtime.preprocess import make_preprocessor
from trainer.config import load_config
from trainer.data.suite import load_tasks
from trainer.errors import UserError, run_cli

TARGET_SPEEDUP = 1.8
TARGET_LOSS = 0.005  # accuracy, as a fraction (0.5 points)
PRECISIONS = ("fp32", "int8")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def eval_rows(tasks, limit: int, seed: int) -> list[np.ndarray]:
    """The analyses' seeded subset: ``limit`` test rows per task (all when 0 or more)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        n = len(task.test)
        out.append(np.sort(rng.choice(n, limit, replace=False)) if 0 < limit < n else np.arange(n))
    return out


def rows_of(pre, inputs) -> list[np.ndarray]:
    """Raw test inputs -> model rows through the runtime's own preprocessing."""
    if pre.modality == "text":
        return [pre.text(t) for t in inputs]
    from PIL import Image

    return [pre.pil_to_row(Image.fromarray(np.asarray(x))) for x in inputs]


def accuracy(engine: Engine, rows: list[np.ndarray], labels: np.ndarray, task: int) -> float:
    correct = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        logits = engine.run(chunk, [task] * len(chunk))
        correct += int(
            sum(int(np.argmax(x)) == y for x, y in zip(logits, labels[start:], strict=False))
        )
    return correct / len(rows)


def graph_ms(
    engines: dict[str, Engine], rows: list[np.ndarray], tasks: int, batch: int, rounds: int
):
    """Median ms of one session.run of ``batch`` mixed-task rows, precisions interleaved."""
    chunk = rows[:batch]
    ids = [i % tasks for i in range(len(chunk))]
    feeds = {k: e.feeds(chunk, ids) for k, e in engines.items()}
    for k, e in engines.items():
        e.run_feeds(feeds[k])
    times = {k: [] for k in engines}
    for r in range(rounds * 10):
        for k in PRECISIONS if r % 2 == 0 else reversed(PRECISIONS):
            t0 = time.perf_counter()
            engines[k].run_feeds(feeds[k])
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def served_rps(dirs: dict[str, Path], args) -> dict[str, list[float]]:
    """Closed-loop req/s of a uniform single-task mix, precisions alternating per round."""
    out = {k: [] for k in dirs}
    for r in range(args.rounds):
        for k in PRECISIONS if r % 2 == 0 else reversed(PRECISIONS):
            spec = load_model_dir(dirs[k])
            field, inputs = model_inputs(spec.manifest)
            tasks = [t.name for t in spec.tasks]
            server = ServerProcess(dirs[k], "--providers", "cpu")
            try:
                result = run_load(
                    LoadSpec(
                        routes={t: [server.addr] for t in tasks},
                        kinds=tasks,
                        field=field,
                        inputs=inputs,
                        requests=args.requests,
                        clients=args.clients,
                        warmup=min(100, args.requests // 4),
                    )
                )
            finally:
                server.stop()
            if result.errors:
                raise UserError(f"{dirs[k]}: {result.errors} failed requests while serving")
            out[k].append(round(result.requests / result.seconds, 2))
    return out


def run(args) -> dict:
    before = loadavg()
    config = load_config(args.config, args.set)
    models = Path(args.models or Path("runs") / "int8" / config.name)
    dirs = {k: models / k for k in ("fp32", "int8")}  # model dirs (export returns the graph)
    manifests = {}
    fp32, _ = export(args.bundle, dirs["fp32"], force=True)
    form = fp32["adapter_form"]["form"] or "auto"
    manifests["fp32"] = fp32
    manifests["int8"], _ = export(
        args.bundle, dirs["int8"], precision="int8", force=True, adapter_form=form
    )
    names = [t["name"] for t in fp32["tasks"]]
    tasks = load_tasks(config, data_root(args), Path(args.cache or "runs/cache"))
    by_name = {t.name: t for t in tasks}
    missing = [n for n in names if n not in by_name or not by_name[n].labelled]
    if missing:
        raise UserError(f"no labelled test split for {missing} in --config {args.config}")
    chosen = eval_rows([by_name[n] for n in names], args.eval_limit, config.seed)
    engines = {}
    for k in PRECISIONS:
        spec = load_model_dir(dirs[k])
        engines[k] = Engine(spec, make_preprocessor(spec), providers="cpu")
    pre = engines["fp32"].pre
    acc = {k: {} for k in PRECISIONS}
    all_rows = []
    for t, name in enumerate(names):
        split = by_name[name].test.take(chosen[t])
        rows = rows_of(pre, split.inputs)
        all_rows += rows[:8]
        for k in PRECISIONS:
            acc[k][name] = accuracy(engines[k], rows, np.asarray(split.labels), t)
    avg = {k: sum(acc[k].values()) / len(names) for k in PRECISIONS}
    order = np.random.default_rng(0).permutation(len(all_rows))
    mixed = [all_rows[i] for i in order]
    graph = graph_ms(engines, mixed, len(names), args.batch, args.rounds)
    del engines
    served = served_rps(dirs, args)
    rps = {k: statistics.median(v) for k, v in served.items()}
    speedup = rps["int8"] / rps["fp32"]
    loss = avg["fp32"] - avg["int8"]
    after = loadavg()
    ok = speedup >= TARGET_SPEEDUP and loss <= TARGET_LOSS
    summary = (
        f"int8 vs fp32 ({config.name}, {len(names)} tasks, adapters {form}): served "
        f"{speedup:.2f}x throughput ({rps['int8']:.1f} vs {rps['fp32']:.1f} req/s), graph "
        f"{graph['fp32'] / graph['int8']:.2f}x at batch {args.batch}; average accuracy "
        f"{100 * avg['int8']:.1f} vs {100 * avg['fp32']:.1f} ({-100 * loss:+.1f} points); "
        f"target >= {TARGET_SPEEDUP}x at <= {100 * TARGET_LOSS:.1f} points: "
        f"{'met' if ok else 'NOT met'}; load average {before[0]:.2f} -> {after[0]:.2f}"
    )
    data = {
        "bench": "int8",
        "config": config.name,
        "bundle": str(args.bundle),
        "tasks": names,
        "eval_limit": args.eval_limit,
        "eval_rows": {n: len(chosen[t]) for t, n in enumerate(names)},
        "accuracy": acc,
        "avg": avg,
        "graph_ms": graph,
        "graph_batch": args.batch,
        "served_rps": served,
        "speedup_served": round(speedup, 3),
        "speedup_graph": round(graph["fp32"] / graph["int8"], 3),
        "accuracy_loss_points": round(100 * loss, 2),
        "int8": manifests["int8"]["int8"],
        "parity": {k: manifests[k]["parity"]["top1_agreement"] for k in PRECISIONS},
        "parity_judged_on": {k: manifests[k]["parity"]["judged_on"] for k in PRECISIONS},
        "adapter_form": manifests["fp32"]["adapter_form"],
        "settings": {"requests": args.requests, "clients": args.clients, "rounds": args.rounds},
        "loadavg_before": before,
        "loadavg_after": after,
        "summary": summary,
    }
    write_result("int8", data, args.out)
    print_table(
        [
            "precision",
            *names,
            "avg",
            "parity top-1",
            f"graph ms (batch {args.batch})",
            "served req/s",
        ],
        [
            [
                k,
                *(f"{100 * acc[k][n]:.1f}" for n in names),
                f"{100 * avg[k]:.1f}",
                f"{manifests[k]['parity']['top1_agreement']:.1%}",
                graph[k],
                " / ".join(str(x) for x in served[k]),
            ]
            for k in PRECISIONS
        ],
        summary,
    )
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__)
    p.add_argument(
        "--bundle", type=Path, required=True, help="a trainer bundle (e.g. runs/x/bundle)"
    )
    p.add_argument("--config", default="text-bench", help="the suite whose test splits to score")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--data", default=None, help="root for {data} (default ../shared/data)")
    p.add_argument("--cache", default=None, help="cache folder (demo data)")
    p.add_argument("--eval-limit", type=int, default=500, help="test rows per task (0: all)")
    p.add_argument("--requests", type=int, default=400, help="served requests per load")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating fp32/int8 loads")
    p.add_argument("--batch", type=int, default=32, help="rows per graph run")
    p.add_argument("--models", default="", help="where the two model dirs go")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_cli(lambda: run(args))[0]


if __name__ == "__main__":
    sys.exit(main())
