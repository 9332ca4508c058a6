"""The serving core's own cost: runtime.server's throughput vs a bare onnxruntime loop.

    python -m bench.core_overhead --model DIR [--task NAME] [--clients 64] [--requests 20000]
        [--rounds 2] [--protocols deepsurgery.v1,open-inference]
        [--server-args "--batches-in-flight 2"]

runtime.server runs in its own process with its default flags (plus --metrics-port and any
`--server-args`); a load
process keeps `--clients` closed-loop clients busy with single-row requests for ONE task
(`--task`, default the first), through each protocol in turn: deepsurgery.v1 Predict and the
Open Inference Protocol's ModelInfer of one row. The server's metrics say which batch sizes it
formed (rows / graph executions over the run). The bare loop then runs the same model dir's
graph in this process, through the same onnxruntime session options (runtime.engine.Engine),
on batches of those sizes (a floor/ceil mix with the same mean) made of the same inputs,
already preprocessed: nothing but session.run. A second baseline adds the preprocessing
(tokenizing / decoding each input and collating the batch) to the loop. Rounds alternate the
three so drift in the machine's load hits them alike.

The ratio served / bare (rows per second) is the core's cost: admission, preprocessing,
batching, gRPC and the protocol conversion, all that runtime.server adds around the graph.
Target: >= 0.9 for each protocol. On a machine whose cores the load generator shares, that
ratio also pays for the clients; so the CPU time is counted too: the server process's CPU
seconds per served row against the bare loop's per row (`cpu_ratio`, the core's own cost with
the clients taken out), and the load generator's CPU per request beside it.
Writes bench/results/core_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.serving_load import (
    RESULTS,
    LoadSpec,
    ServerProcess,
    loadavg,
    model_inputs,
    open_model_dir,
    run_load,
)

TARGET = 0.9
PROTOCOLS = ("deepsurgery.v1", "open-inference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_counters(port: int) -> tuple[float, float, dict[str, float]]:
    """(rows run, graph executions, batch-rows histogram buckets) from the server's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    rows = runs = 0.0
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "deepsurgery_inference_count_total":
                rows = s.value
            elif s.name == "deepsurgery_execution_count_total":
                runs = s.value
            elif s.name == "deepsurgery_batch_rows_bucket":
                buckets[s.labels["le"]] = s.value
    return rows, runs, buckets


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the load generator processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sizes_with_mean(mean: float, count: int, max_batch: int) -> list[int]:
    """`count` batch sizes of floor/ceil(mean), mixed so that their mean is `mean`."""
    mean = min(max(mean, 1.0), float(max_batch))
    lo = math.floor(mean)
    high = round((mean - lo) * count)
    return [lo + 1] * high + [lo] * (count - high) if high else [lo] * count


class BareLoop:
    """The graph alone on the server's batch sizes: session.run (or preprocessing + run)."""

    def __init__(self, model: Path, task: str, inputs: list, kind: str, providers: str):
        from runtime.engine import Engine
        from runtime.manifest import load_model_dir
        from runtime.preprocess import make_preprocessor

        spec = load_model_dir(model)
        self.pre = make_preprocessor(spec)
        self.engine = Engine(spec, self.pre, providers=providers)
        self.task = [t.name for t in spec.tasks].index(task)
        self.inputs, self.kind = inputs, kind
        self.rows = [self.row(x) for x in inputs]

    def row(self, item) -> np.ndarray:
        return self.pre.text(item) if self.kind == "text" else self.pre.image(item)

    def run(self, sizes: list[int], preprocess: bool) -> tuple[float, float]:
        """(rows per second, CPU seconds per row) over batches of `sizes` (inputs in turn)."""
        n, cursor, rows = len(self.inputs), 0, 0
        t0, cpu0 = time.perf_counter(), time.process_time()
        for size in sizes:
            idx = [(cursor + i) % n for i in range(size)]
            cursor += size
            batch = (
                [self.row(self.inputs[i]) for i in idx]
                if preprocess
                else [self.rows[i] for i in idx]
            )
            feeds = self.engine.feeds(batch, [self.task] * size, list(range(size)))
            self.engine.run_feeds(feeds)
            rows += size
        return rows / (time.perf_counter() - t0), (time.process_time() - cpu0) / rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.core_overhead", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--task", help="the one task asked (default: the first)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20000, help="timed requests per protocol")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2, help="alternations (requests split)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--max-batch", type=int, default=32, help="the server's (its default)")
    p.add_argument("--providers", default="cpu", choices=["auto", "cuda", "cpu"])
    p.add_argument("--server-args", default="", help="more runtime.server flags, one string")
    p.add_argument("--out", type=Path, default=RESULTS / "core_overhead.json")
    args = p.parse_args(argv)

    spec = open_model_dir("bench.core_overhead", args.model)
    if spec is None:
        return 2
    tasks = [t.name for t in spec.tasks]
    task = args.task or tasks[0]
    protocols = [x for x in args.protocols.split(",") if x]
    if task not in tasks or not set(protocols) <= set(PROTOCOLS):
        print(
            f"bench.core_overhead: error: --task must be one of {tasks} and --protocols of "
            f"{list(PROTOCOLS)}",
            file=sys.stderr,
        )
        return 2
    kind, inputs = model_inputs(spec.manifest)
    load_before = loadavg()
    bare = BareLoop(args.model, task, inputs, kind, args.providers)
    metrics_port = free_port()
    flags = ["--providers", args.providers, "--max-batch", str(args.max_batch)]
    flags += ["--metrics-port", str(metrics_port), *shlex.split(args.server_args)]
    server = ServerProcess(args.model, *flags)
    per_round = max(1, args.requests // args.rounds)
    served: dict[str, list] = {x: [] for x in protocols}
    formed: dict[str, list] = {x: [] for x in protocols}
    bare_rps: dict[str, list] = {x: [] for x in protocols}
    bare_pre_rps: dict[str, list] = {x: [] for x in protocols}
    server_cpu: dict[str, list] = {x: [] for x in protocols}  # seconds per served row
    client_cpu: dict[str, list] = {x: [] for x in protocols}
    bare_cpu: dict[str, list] = {x: [] for x in protocols}
    try:
        for k in range(args.rounds):
            for protocol in protocols[k % len(protocols) :] + protocols[: k % len(protocols)]:
                rows0, runs0, _ = batch_counters(metrics_port)
                cpu0, load_cpu0 = process_cpu(server.proc.pid), children_cpu()
                result = run_load(
                    LoadSpec(
                        routes={task: [server.addr]},
                        kinds=[task],
                        field=kind,
                        inputs=inputs,
                        requests=per_round,
                        clients=args.clients,
                        warmup=args.warmup if k == 0 else 0,
                        protocol=protocol,
                    )
                )
                cpu1, load_cpu1 = process_cpu(server.proc.pid), children_cpu()
                rows1, runs1, _ = batch_counters(metrics_port)
                if result.errors:
                    print(f"errors ({protocol}): {result.error_samples}", file=sys.stderr)
                    return 1
                mean = (rows1 - rows0) / max(1.0, runs1 - runs0)  # warmup included: same load
                formed[protocol].append(mean)
                served[protocol].append(result.requests / result.seconds)
                done = max(1.0, rows1 - rows0)  # rows the server ran (warmup included)
                server_cpu[protocol].append((cpu1 - cpu0) / done)
                client_cpu[protocol].append((load_cpu1 - load_cpu0) / done)
                sizes = sizes_with_mean(mean, max(1, round(per_round / mean)), args.max_batch)
                rps, cpu = bare.run(sizes, preprocess=False)
                bare_rps[protocol].append(rps)
                bare_cpu[protocol].append(cpu)
                bare_pre_rps[protocol].append(bare.run(sizes, preprocess=True)[0])
        _, _, histogram = batch_counters(metrics_port)
    finally:
        server.stop()
    rows = []
    for protocol in protocols:
        s, b, bp = (float(np.mean(v[protocol])) for v in (served, bare_rps, bare_pre_rps))
        sc, cc, bc = (float(np.mean(v[protocol])) for v in (server_cpu, client_cpu, bare_cpu))
        rows.append(
            {
                "protocol": protocol,
                "mean_batch_rows": round(float(np.mean(formed[protocol])), 2),
                "served_rows_per_s": round(s, 1),
                "bare_run_rows_per_s": round(b, 1),
                "bare_preprocess_run_rows_per_s": round(bp, 1),
                "ratio": round(s / b, 3),
                "ratio_vs_preprocess_run": round(s / bp, 3),
                "server_cpu_ms_per_row": round(sc * 1000, 3),
                "bare_cpu_ms_per_row": round(bc * 1000, 3),
                "client_cpu_ms_per_row": round(cc * 1000, 3),
                "cpu_ratio": round(bc / sc, 3),
            }
        )
    worst = min(r["ratio"] for r in rows)
    summary = (
        f"core_overhead ({task}, {args.clients} clients): "
        + ", ".join(f"{r['protocol']} {r['ratio']:.2f}x bare session.run" for r in rows)
        + f" (target >= {TARGET}x: {'met' if worst >= TARGET else 'NOT met'}); CPU per row "
        + ", ".join(f"{r['protocol']} {r['cpu_ratio']:.2f}x bare" for r in rows)
    )
    report = {
        "bench": "core_overhead",
        "model": str(args.model),
        "task": task,
        "rows": rows,
        "batch_rows_histogram": histogram,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
