"""Fused multi-task server vs one server per task, under the same concurrent load.

    python -m bench.serving_load --model DIR [--requests 20000] [--clients 64] [--no-naive]

Fused: one `runtime.server` on model.onnx answers every task (and `*`) from one batched
backbone pass. Naive: one `runtime.server --task NAME` process per task, each on its `per_task`
graph; a `*` request fans out to all of them. The load generator runs in its own process with
`--clients` concurrent clients sending a uniform mix of every task and `*`. Reports throughput,
p50/p95/p99 latency, errors (must be 0) and server memory (peak RSS, summed over processes),
then the fused/naive throughput and memory ratios. Writes bench/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def data_root() -> Path:
    return Path(os.environ.get("DEEPSURGERY_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------- inputs


def text_inputs(task_names: list[str], n: int = 512, seed: int = 0) -> list[str]:
    """Real test texts of the model's tasks when ../shared has them, else any task's."""
    root = data_root() / "text"
    files = [root / t / "test.jsonl" for t in task_names if (root / t / "test.jsonl").is_file()]
    files = files or sorted(root.glob("*/test.jsonl"))
    texts = []
    for path in files:
        with open(path) as f:
            for _, line in zip(range(n // max(1, len(files)) + 1), f, strict=False):
                texts.append(json.loads(line)["text"])
    if not texts:  # no shared data: short synthetic sentences
        rng = random.Random(seed)
        words = "the market team game stocks great terrible food movie science won fell".split()
        texts = [" ".join(rng.choices(words, k=rng.randint(4, 40))) for _ in range(n)]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def image_inputs(n: int = 64, seed: int = 0) -> list[bytes]:
    """Encoded sample images (JPEG, PPM) from ../shared, else random PNGs."""
    files = sorted(p for p in (data_root() / "images" / "samples").glob("*/*") if p.is_file())
    if files:
        return [p.read_bytes() for p in files[:n]]
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, 16)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def model_inputs(manifest: dict) -> tuple[str, list]:
    """(oneof field name, inputs) for the model's modality."""
    if manifest["modality"] == "text":
        return "text", text_inputs([t["name"] for t in manifest["tasks"]])
    return "image", image_inputs()


# ---------------------------------------------------------------- server processes


def rss_kib(pid: int) -> dict[str, int]:
    """Current and peak resident memory of a process, KiB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_kib": out.get("VmRSS", 0), "peak_kib": out.get("VmHWM", 0)}


class ServerProcess:
    """`python -m runtime.server ... --port 0` in a subprocess; waits until it serves."""

    def __init__(self, model: Path, *flags: str, log_path: Path | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
        port_file = Path(self.tmp.name) / "port"
        self.log = open(log_path or Path(self.tmp.name) / "log", "w+")
        cmd = [sys.executable, "-m", "runtime.server", "--model", str(model), "--port", "0"]
        cmd += ["--port-file", str(port_file), "--log-level", "WARNING", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.log.seek(0)
                raise RuntimeError(f"server {flags} did not start: {self.log.read()[-2000:]}")
            time.sleep(0.05)
        self.addr = f"127.0.0.1:{port_file.read_text().strip()}"

    def memory(self) -> dict[str, int]:
        return rss_kib(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()
        return self.proc.returncode


# ---------------------------------------------------------------- load generator


@dataclass
class LoadSpec:
    routes: dict[str, list[str]]  # request kind ("*" or a task) -> server addresses to call
    kinds: list[str]  # the mix, sampled uniformly
    field: str  # "text" | "image"
    inputs: list
    requests: int
    clients: int
    warmup: int
    channels: int = 4
    seed: int = 0
    fan_out_star: bool = False  # naive: "*" is one request per task server, task field each


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


async def _load(spec: LoadSpec) -> LoadResult:
    import grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

    addrs = sorted({a for v in spec.routes.values() for a in v})
    stubs = {
        a: [pb_grpc.InferenceStub(grpc.aio.insecure_channel(a)) for _ in range(spec.channels)]
        for a in addrs
    }
    rng = random.Random(spec.seed)
    plan = [(rng.choice(spec.kinds), rng.randrange(len(spec.inputs))) for _ in range(spec.requests)]
    task_of = {a: k for k, v in spec.routes.items() if k != "*" for a in v}

    def request(task: str, i: int) -> pb.PredictRequest:
        return pb.PredictRequest(task=task, input=pb.Input(**{spec.field: spec.inputs[i]}))

    async def one(kind: str, i: int, client: int) -> None:
        calls = []
        for addr in spec.routes[kind]:
            task = task_of[addr] if spec.fan_out_star and kind == "*" else kind
            stub = stubs[addr][client % spec.channels]
            calls.append(stub.Predict(request(task, i), timeout=120))
        await asyncio.gather(*calls)

    latencies: list[float] = []
    errors: list[str] = []
    cursor = 0

    async def client(c: int, upto: int, record: bool) -> None:
        nonlocal cursor
        while cursor < upto:
            kind, i = plan[cursor % len(plan)]
            cursor += 1
            t0 = time.perf_counter()
            try:
                await one(kind, i, c)
            except grpc.RpcError as e:
                if record:
                    errors.append(f"{kind}: {e.code().name}: {e.details()}")
                continue
            if record:
                latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client(c, spec.warmup, False) for c in range(spec.clients)))
    cursor = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c, spec.requests, True) for c in range(spec.clients)))
    seconds = time.perf_counter() - t0
    return LoadResult(spec.requests, len(errors), seconds, latencies, errors[:5])


def _load_process(spec: LoadSpec, queue) -> None:
    queue.put(asyncio.run(_load(spec)))


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load generator in its own process (it must not share the servers' cores' GIL)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---------------------------------------------------------------- report


def summarize(name: str, result: LoadResult, memory_kib: int, processes: int) -> dict:
    lat = np.asarray(result.latencies_ms) if result.latencies_ms else np.zeros(1)
    return {
        "deployment": name,
        "processes": processes,
        "requests": result.requests,
        "errors": result.errors,
        "seconds": round(result.seconds, 3),
        "throughput_rps": round(result.requests / result.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p95_ms": round(float(np.percentile(lat, 95)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "server_peak_rss_mib": round(memory_kib / 1024, 1),
        "error_samples": result.error_samples,
    }


def print_table(rows: list[dict], summary: str) -> None:
    cols = ["deployment", "processes", "requests", "errors", "throughput_rps", "p50_ms"]
    cols += ["p95_ms", "p99_ms", "server_peak_rss_mib"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    print(summary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving_load", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="model dir (export.onnx --per-task)")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--warmup", type=int, default=500, help="requests sent before timing")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--max-batch-tokens", type=int, default=0, help="server flag (0: no cap)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="server flag (0: auto)")
    p.add_argument("--providers", default="cpu", choices=["auto", "cuda", "cpu"])
    p.add_argument("--no-naive", action="store_true", help="only measure the fused server")
    p.add_argument("--out", type=Path, default=RESULTS / "serving_load.json")
    args = p.parse_args(argv)

    from runtime.manifest import ModelDirError, load_model_dir

    try:
        spec = load_model_dir(args.model)
    except ModelDirError as e:
        print(f"bench.serving_load: error: {e}", file=sys.stderr)
        return 2
    manifest = spec.manifest
    tasks = [t.name for t in spec.tasks]
    per_task = manifest.get("per_task") or {}
    run_naive = not args.no_naive
    if run_naive and set(per_task) != set(tasks):
        print(
            f"bench.serving_load: error: the manifest's per_task {sorted(per_task)} does not "
            f"cover {tasks}; export with --per-task, or pass --no-naive",
            file=sys.stderr,
        )
        return 2
    field_name, inputs = model_inputs(manifest)
    kinds = [*tasks, "*"]
    flags = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    flags += ["--providers", args.providers, "--max-batch-tokens", str(args.max_batch_tokens)]
    flags += ["--intra-op-threads", str(args.intra_op_threads)]
    common = dict(
        kinds=kinds,
        field=field_name,
        inputs=inputs,
        requests=args.requests,
        clients=args.clients,
        warmup=args.warmup,
    )

    rows = []
    fused = ServerProcess(args.model, *flags)
    try:
        routes = {k: [fused.addr] for k in kinds}
        result = run_load(LoadSpec(routes=routes, **common))
        rows.append(summarize("fused", result, fused.memory()["peak_kib"], 1))
    finally:
        fused.stop()
    if run_naive:
        servers = {}
        try:
            for t in tasks:
                servers[t] = ServerProcess(args.model, "--task", t, *flags)
            routes = {t: [s.addr] for t, s in servers.items()}
            routes["*"] = [s.addr for s in servers.values()]
            result = run_load(LoadSpec(routes=routes, fan_out_star=True, **common))
            memory = sum(s.memory()["peak_kib"] for s in servers.values())
            rows.append(summarize(f"naive x{len(tasks)}", result, memory, len(tasks)))
        finally:
            for s in servers.values():
                s.stop()

    fused_row = rows[0]
    errors = sum(r["errors"] for r in rows)
    report = {
        "bench": "serving_load",
        "model": str(args.model),
        "modality": spec.modality,
        "tasks": tasks,
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "rows": rows,
    }
    if run_naive:
        naive = rows[1]
        tput = fused_row["throughput_rps"] / naive["throughput_rps"]
        mem = fused_row["server_peak_rss_mib"] / naive["server_peak_rss_mib"]
        report["throughput_ratio"] = round(tput, 3)
        report["memory_ratio"] = round(mem, 3)
        summary = (
            f"serving_load: fused {tput:.2f}x naive throughput (target >= 1.0x) with "
            f"{mem:.2f}x its memory (target <= 1/{len(tasks)} = {1 / len(tasks):.2f}x); "
            f"errors {errors}"
        )
    else:
        summary = (
            f"serving_load: fused {fused_row['throughput_rps']} req/s, p99 "
            f"{fused_row['p99_ms']} ms, {fused_row['server_peak_rss_mib']} MiB; errors {errors}"
        )
    for r in rows:
        for sample in r["error_samples"]:
            print(f"error sample ({r['deployment']}): {sample}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_table(rows, summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
