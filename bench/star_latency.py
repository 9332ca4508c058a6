"""What a `*` request costs next to a single-task request, from a client, one at a time.

    python -m bench.star_latency --model DIR[,DIR...] [--n 200] [--task NAME] [--threads N]

For each model dir, `runtime.server` runs in its own process and ONE client sends, one after
another, a single-task Predict and a `*` Predict (every task) of the same input, alternating
which goes first, cycling over real inputs of the model's tasks. The `*` request is one input
and T rows: the graph runs the blocks before the first task-specific operation once (all of
them for `none`/`surgery` bundles, blocks 1..k for SurgeryV2 with branch block k) and the
rest per task, so its expected cost is k/L + T(L-k)/L backbone passes against 1 (surgery:
one pass plus T heads). Target on a `surgery` bundle: median `*` latency <= 1.1x the median
single-task latency. Prints a table whose last line is a summary; writes
bench/results/star_latency.json with the load averages before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import RESULTS, print_table, write_result
from bench.serving_load import ServerProcess, model_inputs

TARGET = 1.1  # `*` / single-task median latency on a surgery bundle


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def expected_passes(manifest: dict) -> float:
    """Backbone passes a `*` request costs against one for a single-task request (blocks
    shared once, the rest once per task; heads and the final adapter not counted)."""
    tasks = len(manifest["tasks"])
    blocks = manifest["backbone"].get("num_blocks") or manifest["backbone"].get("layers")
    shared = manifest.get("shared_blocks")
    if not blocks or shared is None:  # a model dir from before the shared prefix: T passes
        return float(tasks)
    return (shared + tasks * (blocks - shared)) / blocks


def describe(manifest: dict) -> dict:
    surgery = (manifest.get("source_bundle") or {}).get("surgery") or {}
    return {
        "mode": surgery.get("mode", "?"),
        "branch_block": surgery.get("branch_block", 0),
        "blocks": manifest["backbone"].get("num_blocks") or manifest["backbone"].get("layers"),
        "tasks": len(manifest["tasks"]),
        "shared_blocks": manifest.get("shared_blocks"),
        "precision": manifest.get("precision"),
        "adapter_form": (manifest.get("adapter_form") or {}).get("form"),
    }


def label(row: dict) -> str:
    return f"{row['mode']} k={row['branch_block']}" if row["mode"] == "surgeryv2" else row["mode"]


def measure(model: Path, n: int, task: str | None, flags: list[str], warmup: int = 10) -> dict:
    """Median latencies of single-task and `*` Predicts of the same inputs, paired."""
    import grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
    from runtime.manifest import load_model_dir

    spec = load_model_dir(model)
    field, inputs = model_inputs(spec.manifest)
    task = task or spec.tasks[0].name
    server = ServerProcess(model, *flags)
    single, star = [], []
    try:
        with grpc.insecure_channel(server.addr) as channel:
            stub = pb_grpc.InferenceStub(channel)

            def call(kind: str, i: int) -> float:
                req = pb.PredictRequest(
                    task=kind, input=pb.Input(**{field: inputs[i % len(inputs)]})
                )
                t0 = time.perf_counter()
                stub.Predict(req, timeout=120)
                return (time.perf_counter() - t0) * 1000

            for i in range(warmup):
                call(task, i)
                call("*", i)
            for i in range(n):
                order = (task, "*") if i % 2 == 0 else ("*", task)
                for kind in order:
                    (star if kind == "*" else single).append(call(kind, i))
    finally:
        server.stop()
    ratios = [s / t for s, t in zip(star, single, strict=True)]
    return {
        "model": str(model),
        **describe(spec.manifest),
        "task": task,
        "calls": n,
        "single_p50_ms": round(statistics.median(single), 3),
        "star_p50_ms": round(statistics.median(star), 3),
        "ratio": round(statistics.median(star) / statistics.median(single), 3),
        "ratio_of_pairs_p50": round(statistics.median(ratios), 3),
        "expected_passes": round(expected_passes(spec.manifest), 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.star_latency", description=__doc__)
    p.add_argument("--model", required=True, help="model dir(s), comma-separated")
    p.add_argument("--n", type=int, default=200, help="paired calls per model dir")
    p.add_argument("--task", help="the single task (default: the first)")
    p.add_argument("--threads", type=int, default=0, help="server --intra-op-threads (0: auto)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    models = [Path(m) for m in args.model.split(",") if m]
    flags = ["--providers", "cpu", "--intra-op-threads", str(args.threads)]
    before = loadavg()
    rows = [measure(m, args.n, args.task, flags) for m in models]
    after = loadavg()
    surgery = [r for r in rows if r["mode"] in ("surgery", "none")]
    parts = [f"{label(r)} {r['ratio']:.2f}x" for r in rows]
    verdict = ""
    if surgery:
        worst = max(r["ratio"] for r in surgery)
        verdict = f"; surgery/none worst {worst:.2f}x ({'meets' if worst <= TARGET else 'misses'}"
        verdict += f" the <= {TARGET}x target)"
    summary = (
        f"star_latency: `*` / single-task median latency {', '.join(parts)}{verdict}; "
        f"load average {before[0]:.2f} -> {after[0]:.2f}"
    )
    header = ["mode", "k", "L", "T", "form", "single p50 ms", "* p50 ms", "ratio"]
    header += ["pair ratio p50", "expected passes"]
    print_table(
        header,
        [
            [
                r["mode"],
                r["branch_block"] if r["mode"] == "surgeryv2" else "-",
                r["blocks"],
                r["tasks"],
                r["adapter_form"],
                r["single_p50_ms"],
                r["star_p50_ms"],
                r["ratio"],
                r["ratio_of_pairs_p50"],
                r["expected_passes"],
            ]
            for r in rows
        ],
        summary,
    )
    write_result(
        "star_latency",
        {
            "bench": "star_latency",
            "rows": rows,
            "target": TARGET,
            "settings": {"n": args.n, "task": args.task, "threads": args.threads},
            "loadavg_before": before,
            "loadavg_after": after,
            "summary": summary,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
