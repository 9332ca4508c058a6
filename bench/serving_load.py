"""Serving under load: fused vs naive, Ray Serve replicas, overload, hot-swap.

    python -m bench.serving_load --model DIR [--requests 20000] [--clients 64] [--no-naive]
    python -m bench.serving_load --model DIR --scenario ray [--replicas 1,2]
    python -m bench.serving_load --model DIR --scenario overload [--overload-factor 4]
        [--max-queue 64] [--duration-s 10]
    python -m bench.serving_load --model DIR --scenario hot-swap [--swaps 3] [--duration-s 10]
    python -m bench.serving_load --model DIR --scenario mixes
        [--mixes distinct,uniform,zipf,identical,star-heavy] [--servers fused,naive,group-by-task]
    python -m bench.serving_load --model DIR --scenario protocols [--v2-rows 1,8] [--rounds 2]

Scenarios other than the default (each prints a table whose last line is a one-line summary
and writes bench/results/serving_<scenario>.json, with the load averages before and after):

- ray: the same closed-loop load against runtime.server (one process) and runtime.serve_ray
  with each --replicas count on a local Ray; throughput, latency, errors and each Model
  replica's peak RSS.
- overload: the sustainable rate R is measured closed-loop first; then an open-loop load
  offers `--overload-factor` x R for --duration-s against runtime.server without a queue bound
  and with --max-queue: latency of the accepted requests, refusals (RESOURCE_EXHAUSTED), other
  errors, and whether the server answers health and a request normally afterwards.
- hot-swap: closed-loop load against runtime.server on a directory of versions while
  `--swaps` new versions are written and SIGHUP'd in; every request must succeed.
- mixes: the task mixes multi-adapter servers are measured with: distinct (each request the
  next task, round robin), uniform (a random task), zipf (task i with weight 1/i^2: one hot
  task), identical (every request the first task), star-heavy (half `*`, half uniform); each
  against the fused server, the naive one-server-per-task deployment and the fused server
  forced to one task per batch (`--group-by-task`, as a server that switches adapters between
  batches). All deployments stay up; for each mix they take turns, `--rounds` times in
  rotating order, so drift in the machine's load hits them alike. Throughput (requests and
  predictions per second: a `*` is T predictions), p50/p99, errors and peak RSS in one
  table; writes bench/results/serving_mixes.json.
- protocols: one runtime.server answers the same closed-loop load (a uniform mix of the tasks,
  no `*`: the Open Inference Protocol has no all-tasks model) through deepsurgery.v1 Predict
  and through the Open Inference Protocol's ModelInfer with each `--v2-rows` rows per request
  (the rows of one request are rows of the batcher); the protocols take turns `--rounds`
  times. Requests and predictions per second, latency, errors, and v2's predictions per second
  over v1's; writes bench/results/serving_protocols.json.

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


def open_model_dir(prog: str, path: Path):
    """The model dir's spec (runtime.manifest), or None after a one-line error naming the
    problem on stderr (the bench then exits 2)."""
    from runtime.manifest import ModelDirError, load_model_dir

    try:
        return load_model_dir(path)
    except ModelDirError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None


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
    plan: list[tuple[str, int]] | None = None  # (kind, input) per request; None: uniform kinds
    protocol: str = "deepsurgery.v1"  # or "open-inference": ModelInfer (no "*" kind)
    rows: int = 1  # open-inference: input rows per ModelInfer (consecutive inputs)


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def open_inference_request(model: str, field: str, items: list):
    """A ModelInfer of `items` (strings or encoded images) as one BYTES tensor [N], raw."""
    import struct

    from protos.inference import grpc_predict_v2_pb2 as v2

    raw = [x.encode() if isinstance(x, str) else x for x in items]
    tensor = v2.ModelInferRequest.InferInputTensor(name=field, datatype="BYTES", shape=[len(raw)])
    contents = b"".join(struct.pack("<I", len(b)) + b for b in raw)
    return v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[contents])


async def _load(spec: LoadSpec) -> LoadResult:
    import grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
    from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

    v2 = spec.protocol == "open-inference"
    make_stub = v2_grpc.GRPCInferenceServiceStub if v2 else pb_grpc.InferenceStub
    addrs = sorted({a for v in spec.routes.values() for a in v})
    stubs = {
        a: [make_stub(grpc.aio.insecure_channel(a)) for _ in range(spec.channels)] for a in addrs
    }
    rng = random.Random(spec.seed)
    plan = spec.plan or [
        (rng.choice(spec.kinds), rng.randrange(len(spec.inputs))) for _ in range(spec.requests)
    ]
    task_of = {a: k for k, v in spec.routes.items() if k != "*" for a in v}

    def request(task: str, i: int) -> pb.PredictRequest:
        return pb.PredictRequest(task=task, input=pb.Input(**{spec.field: spec.inputs[i]}))

    def infer_request(task: str, i: int):
        n = len(spec.inputs)
        return open_inference_request(
            task, spec.field, [spec.inputs[(i + r) % n] for r in range(spec.rows)]
        )

    async def one(kind: str, i: int, client: int) -> None:
        calls = []
        for addr in spec.routes[kind]:
            task = task_of[addr] if spec.fan_out_star and kind == "*" else kind
            stub = stubs[addr][client % spec.channels]
            if v2:
                calls.append(stub.ModelInfer(infer_request(task, i), timeout=120))
            else:
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


def _async_process(load, spec, queue) -> None:
    queue.put(asyncio.run(load(spec)))


def in_process(load, spec):
    """``asyncio.run(load(spec))`` in a spawned process, its result returned: a load generator
    must not share the servers' GIL (``load`` is a module-level coroutine function)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_async_process, args=(load, spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_load(spec: LoadSpec) -> LoadResult:
    """The closed-loop load generator, in its own process."""
    return in_process(_load, spec)


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


# ---------------------------------------------------------------- open-loop load


@dataclass
class OpenSpec:
    addr: str
    kinds: list[str]
    field: str
    inputs: list
    rate: float  # requests offered per second, whatever the server does
    seconds: float
    timeout: float = 120.0
    seed: int = 0


@dataclass
class OpenResult:
    offered_rps: float  # what the generator actually achieved
    sent: int
    ok_ms: list[float]
    refused_ms: list[float]
    errors: list[str]
    seconds: float  # until the last answer


async def _open_load(spec: OpenSpec) -> OpenResult:
    import grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(spec.addr) for _ in range(4)]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    rng = random.Random(spec.seed)
    n = int(spec.rate * spec.seconds)
    ok_ms, refused_ms, errors = [], [], []

    async def one(i: int) -> None:
        kind = rng.choice(spec.kinds)
        inp = spec.inputs[rng.randrange(len(spec.inputs))]
        req = pb.PredictRequest(task=kind, input=pb.Input(**{spec.field: inp}))
        t0 = time.perf_counter()
        try:
            await stubs[i % len(stubs)].Predict(req, timeout=spec.timeout)
            ok_ms.append((time.perf_counter() - t0) * 1000)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused_ms.append((time.perf_counter() - t0) * 1000)
            else:
                errors.append(f"{e.code().name}: {e.details()}")

    start = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = start + i / spec.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    sending = time.perf_counter() - start
    await asyncio.gather(*tasks)
    total = time.perf_counter() - start
    for c in channels:
        await c.close()
    return OpenResult(n / sending, n, ok_ms, refused_ms, errors, total)


def run_open(spec: OpenSpec) -> OpenResult:
    """The open-loop (fixed arrival rate) load generator, in its own process."""
    return in_process(_open_load, spec)


# ---------------------------------------------------------------- scenarios


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


def healthy(addr: str, spec: LoadSpec) -> tuple[bool, float]:
    """Health SERVING, and the p50 ms of 20 sequential requests."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(addr) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        stub = pb_grpc.InferenceStub(channel)
        times = []
        for i in range(20):
            req = pb.PredictRequest(
                task="*", input=pb.Input(**{spec.field: spec.inputs[i % len(spec.inputs)]})
            )
            t0 = time.perf_counter()
            stub.Predict(req, timeout=30)
            times.append((time.perf_counter() - t0) * 1000)
    return status.status == health_pb2.HealthCheckResponse.SERVING, pct(times, 50)


def print_rows(rows: list[dict], cols: list[str], summary: str) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(cols, widths, strict=True)))
    print(summary)


def write_report(args, name: str, report: dict) -> None:
    out = (
        args.out if args.out != RESULTS / "serving_load.json" else RESULTS / f"serving_{name}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))


def scenario_overload(args, flags: list[str], common: dict) -> int:
    load_before = loadavg()
    spec = LoadSpec(routes={k: [] for k in common["kinds"]}, **common)
    server = ServerProcess(args.model, *flags)
    try:
        spec.routes = {k: [server.addr] for k in spec.kinds}
        closed = run_load(spec)
        sustainable = closed.requests / closed.seconds
    finally:
        server.stop()
    rate = args.overload_factor * sustainable
    rows = []
    for bound in (0, args.max_queue):
        extra = ["--max-queue", str(bound)] if bound else []
        server = ServerProcess(args.model, *flags, *extra)
        try:
            res = run_open(
                OpenSpec(server.addr, spec.kinds, spec.field, spec.inputs, rate, args.duration_s)
            )
            ok, after_ms = healthy(server.addr, spec)
            mem = server.memory()["peak_kib"]
        finally:
            server.stop()
        rows.append(
            {
                "server": f"--max-queue {bound}" if bound else "unbounded queue",
                "offered_rps": round(res.offered_rps, 1),
                "sent": res.sent,
                "ok": len(res.ok_ms),
                "refused": len(res.refused_ms),
                "other_errors": len(res.errors),
                "goodput_rps": round(len(res.ok_ms) / res.seconds, 1),
                "ok_p50_ms": pct(res.ok_ms, 50),
                "ok_p99_ms": pct(res.ok_ms, 99),
                "ok_max_ms": pct(res.ok_ms, 100),
                "refused_p99_ms": pct(res.refused_ms, 99),
                "healthy_after": ok,
                "after_p50_ms": after_ms,
                "peak_rss_mib": round(mem / 1024, 1),
                "error_samples": res.errors[:3],
            }
        )
    free, bounded = rows
    summary = (
        f"overload at {args.overload_factor:g}x the sustainable {sustainable:.0f} req/s: "
        f"unbounded p99 {free['ok_p99_ms']} ms (max {free['ok_max_ms']}) vs --max-queue "
        f"{args.max_queue} p99 {bounded['ok_p99_ms']} ms (max {bounded['ok_max_ms']}), "
        f"{bounded['refused']}/{bounded['sent']} refused (p99 {bounded['refused_p99_ms']} ms); "
        f"healthy after: {free['healthy_after']}/{bounded['healthy_after']}; other errors "
        f"{free['other_errors'] + bounded['other_errors']}"
    )
    cols = ["server", "offered_rps", "sent", "ok", "refused", "other_errors", "goodput_rps"]
    cols += ["ok_p50_ms", "ok_p99_ms", "ok_max_ms", "refused_p99_ms", "healthy_after"]
    cols += ["after_p50_ms", "peak_rss_mib"]
    report = {
        "bench": "serving_load",
        "scenario": "overload",
        "model": str(args.model),
        "sustainable_rps": round(sustainable, 1),
        "offered_factor": args.overload_factor,
        "rows": rows,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    write_report(args, "overload", report)
    print_rows(rows, cols, summary)
    return (
        1 if free["other_errors"] + bounded["other_errors"] or not bounded["healthy_after"] else 0
    )


def scenario_hot_swap(args, flags: list[str], common: dict) -> int:
    import shutil
    import signal

    load_before = loadavg()
    tmp = tempfile.TemporaryDirectory(prefix="bench-versions-")
    versions = Path(tmp.name)
    shutil.copytree(args.model, versions / "1")
    server = ServerProcess(versions, *flags, "--metrics-port", "0", "--log-level", "INFO")
    requests = max(args.requests, 1)
    spec = LoadSpec(
        routes={k: [server.addr] for k in common["kinds"]}, **(common | {"requests": requests})
    )
    swapped = []

    def swapper() -> None:
        period = args.duration_s / (args.swaps + 1)
        for v in range(2, args.swaps + 2):
            time.sleep(period)
            staging = versions / f".staging-{v}"
            shutil.copytree(args.model, staging)
            os.replace(staging, versions / str(v))  # complete, then one rename
            server.proc.send_signal(signal.SIGHUP)
            swapped.append((v, time.monotonic()))

    import threading

    try:
        t = threading.Thread(target=swapper)
        # closed-loop load for about --duration-s: size it from a short calibration
        calib = run_load(LoadSpec(**(vars(spec) | {"requests": 200, "warmup": 0})))
        spec.requests = max(200, int(calib.requests / calib.seconds * args.duration_s))
        t0 = time.monotonic()
        t.start()
        result = run_load(spec)
        t.join()
        seconds = time.monotonic() - t0
        time.sleep(1.0)
        server.log.flush()
        server.log.seek(0)
        log_text = server.log.read()
        mem = server.memory()["peak_kib"]
    finally:
        server.stop()
        tmp.cleanup()
    served = [v for v, _ in swapped if f"now serving version {v} " in log_text]
    row = summarize("hot-swap", result, mem, 1) | {
        "swaps_sent": len(swapped),
        "swaps_done": len(served),
        "refused": log_text.count(" refused: "),
    }
    row["seconds_total"] = round(seconds, 2)
    summary = (
        f"hot-swap: {len(served)}/{len(swapped)} versions swapped in under {args.clients} "
        f"clients; {row['requests']} requests, {row['errors']} failed (target 0); "
        f"{row['throughput_rps']} req/s, p99 {row['p99_ms']} ms"
    )
    cols = ["deployment", "requests", "errors", "throughput_rps", "p50_ms", "p95_ms", "p99_ms"]
    cols += ["swaps_sent", "swaps_done", "server_peak_rss_mib"]
    report = {
        "bench": "serving_load",
        "scenario": "hot-swap",
        "model": str(args.model),
        "rows": [row],
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    write_report(args, "hot_swap", report)
    print_rows([row], cols, summary)
    return 1 if row["errors"] or len(served) != len(swapped) else 0


class RayProcess:
    """`python -m runtime.serve_ray` on a local Ray; waits until it serves."""

    def __init__(self, model: Path, replicas: int, *flags: str):
        import socket

        self.tmp = tempfile.TemporaryDirectory(prefix="bench-ray-")
        d = Path(self.tmp.name)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.status_file = d / "status.json"
        self.log = open(d / "log", "w+")
        cmd = [sys.executable, "-m", "runtime.serve_ray", "--model", str(model)]
        cmd += ["--replicas", str(replicas), "--port", str(port), "--port-file", str(d / "port")]
        cmd += ["--status-file", str(self.status_file), "--log-level", "WARNING", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (d / "port").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("serve_ray did not start")
            time.sleep(0.2)
        self.addr = f"127.0.0.1:{port}"

    def replica_memory(self) -> list[dict]:
        status = json.loads(self.status_file.read_text())
        out = []
        for r in status["replicas"]:
            try:
                out.append({"deployment": r["deployment"], **rss_kib(r["pid"])})
            except OSError:
                pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


def scenario_ray(args, flags: list[str], common: dict) -> int:
    load_before = loadavg()
    counts = [int(x) for x in args.replicas.split(",")]
    rows = []
    server = ServerProcess(args.model, *flags)
    try:
        result = run_load(LoadSpec(routes={k: [server.addr] for k in common["kinds"]}, **common))
        rows.append(summarize("runtime.server", result, server.memory()["peak_kib"], 1))
        rows[-1]["replica_peak_rss_mib"] = rows[-1]["server_peak_rss_mib"]
    finally:
        server.stop()
    ray_flags = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    ray_flags += ["--providers", args.providers, "--replica-cpus", str(args.replica_cpus)]
    if args.intra_op_threads:
        ray_flags += ["--intra-op-threads", str(args.intra_op_threads)]
    for n in counts:
        ray = RayProcess(args.model, n, *ray_flags)
        try:
            result = run_load(LoadSpec(routes={k: [ray.addr] for k in common["kinds"]}, **common))
            mem = ray.replica_memory()
        finally:
            ray.stop()
        model_mem = [m["peak_kib"] for m in mem if m["deployment"] == "Model"]
        ingress_mem = [m["peak_kib"] for m in mem if m["deployment"] != "Model"]
        row = summarize(f"ray x{n}", result, sum(model_mem), n)
        row["replica_peak_rss_mib"] = round(max(model_mem or [0]) / 1024, 1)
        row["ingress_peak_rss_mib"] = round(sum(ingress_mem) / 1024, 1)
        rows.append(row)
    base = rows[0]["throughput_rps"]
    parts = [
        f"{r['deployment']} {r['throughput_rps']} req/s ({r['throughput_rps'] / base:.2f}x)"
        for r in rows
    ]
    errors = sum(r["errors"] for r in rows)
    summary = (
        f"ray: {', '.join(parts)} on {os.cpu_count()} cores; Model replica peak RSS "
        f"{', '.join(str(r['replica_peak_rss_mib']) for r in rows[1:])} MiB; errors {errors}"
    )
    cols = ["deployment", "processes", "requests", "errors", "throughput_rps", "p50_ms"]
    cols += ["p95_ms", "p99_ms", "replica_peak_rss_mib", "ingress_peak_rss_mib"]
    report = {
        "bench": "serving_load",
        "scenario": "ray",
        "model": str(args.model),
        "rows": rows,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    write_report(args, "ray", report)
    print_rows(rows, cols, summary)
    return 1 if errors else 0


def scenario_protocols(args, flags: list[str], common: dict, tasks: list[str]) -> int:
    """deepsurgery.v1 vs the Open Inference Protocol on one server, taking turns."""
    load_before = loadavg()
    v2_rows = [int(x) for x in args.v2_rows.split(",")]
    runs = [("deepsurgery.v1", 1)] + [("open-inference", n) for n in v2_rows]
    per_round = max(1, args.requests // args.rounds)
    results: dict[tuple[str, int], list[LoadResult]] = {r: [] for r in runs}
    server = ServerProcess(args.model, *flags)
    try:
        for k in range(args.rounds):
            for protocol, rows in runs[k % len(runs) :] + runs[: k % len(runs)]:
                spec = LoadSpec(
                    routes={t: [server.addr] for t in tasks},
                    **(common | {"kinds": tasks, "requests": per_round}),
                    protocol=protocol,
                    rows=rows,
                )
                results[protocol, rows].append(run_load(spec))
        memory = server.memory()["peak_kib"]
    finally:
        server.stop()
    table = []
    for (protocol, rows), parts in results.items():
        merged = LoadResult(
            sum(r.requests for r in parts),
            sum(r.errors for r in parts),
            sum(r.seconds for r in parts),
            [x for r in parts for x in r.latencies_ms],
            [x for r in parts for x in r.error_samples][:5],
        )
        name = "Predict" if protocol == "deepsurgery.v1" else f"ModelInfer x{rows}"
        row = summarize(f"{protocol} {name}", merged, memory, 1)
        row["protocol"], row["rows_per_request"] = protocol, rows
        row["predictions_per_s"] = round(merged.requests * rows / merged.seconds, 1)
        table.append(row)
    v1 = table[0]["predictions_per_s"]
    for row in table:
        row["vs_v1"] = round(row["predictions_per_s"] / v1, 3)
    errors = sum(r["errors"] for r in table)
    parts = [
        f"{r['deployment']} {r['predictions_per_s']} pred/s ({r['vs_v1']:.2f}x)" for r in table
    ]
    summary = (
        f"protocols ({len(tasks)} tasks, {args.clients} clients): {', '.join(parts)}; "
        f"errors {errors}"
    )
    cols = ["deployment", "requests", "errors", "throughput_rps", "predictions_per_s", "vs_v1"]
    cols += ["p50_ms", "p99_ms", "server_peak_rss_mib"]
    report = {
        "bench": "serving_load",
        "scenario": "protocols",
        "model": str(args.model),
        "tasks": tasks,
        "rows": table,
        "v2_vs_v1": {r["deployment"]: r["vs_v1"] for r in table[1:]},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    write_report(args, "protocols", report)
    print_rows(table, cols, summary)
    return 1 if errors else 0


MIXES = ("distinct", "uniform", "zipf", "identical", "star-heavy")
SERVERS = ("fused", "naive", "group-by-task")
ZIPF_EXPONENT = 2.0  # task i (1-based) gets weight 1/i^2: with 4 tasks the first has 70%


def mix_plan(mix: str, tasks: list[str], n: int, inputs: int, seed: int = 0) -> list:
    """``n`` requests (kind, input index) of a task mix; inputs are drawn uniformly."""
    rng = random.Random(seed)
    if mix == "distinct":
        kinds = [tasks[i % len(tasks)] for i in range(n)]
    elif mix == "uniform":
        kinds = [rng.choice(tasks) for _ in range(n)]
    elif mix == "zipf":
        weights = [1 / (i + 1) ** ZIPF_EXPONENT for i in range(len(tasks))]
        kinds = rng.choices(tasks, weights, k=n)
    elif mix == "identical":
        kinds = [tasks[0]] * n
    elif mix == "star-heavy":
        kinds = ["*" if rng.random() < 0.5 else rng.choice(tasks) for _ in range(n)]
    else:
        raise ValueError(f"unknown mix {mix!r}; one of {', '.join(MIXES)}")
    return [(k, rng.randrange(inputs)) for k in kinds]


def _start_deployment(kind: str, args, flags: list[str], tasks: list[str]):
    """-> (server processes, routes) of one deployment: fused, naive or group-by-task."""
    processes: dict[str, ServerProcess] = {}
    try:
        if kind == "naive":
            for t in tasks:
                processes[t] = ServerProcess(args.model, "--task", t, *flags)
            routes = {t: [s.addr] for t, s in processes.items()}
            routes["*"] = [s.addr for s in processes.values()]
        else:
            extra = ["--group-by-task"] if kind == "group-by-task" else []
            extra += ["--batches-in-flight", str(args.batches_in_flight)]
            processes["all"] = ServerProcess(args.model, *flags, *extra)
            routes = {k: [processes["all"].addr] for k in [*tasks, "*"]}
    except BaseException:
        for proc in processes.values():
            proc.stop()
        raise
    return processes, routes


def scenario_mixes(args, flags: list[str], common: dict, tasks: list[str]) -> int:
    """Every deployment is started once and kept up (idle servers cost memory, not CPU); for
    each mix the deployments take turns, ``--rounds`` times in rotating order, so load from
    other jobs on the machine drifts over all of them alike."""
    load_before = loadavg()
    mixes = [m for m in args.mixes.split(",") if m]
    servers = [s for s in args.servers.split(",") if s]
    for name in (*mixes, *servers):
        if name not in (*MIXES, *SERVERS):
            print(f"bench.serving_load: error: unknown mix or server {name!r}", file=sys.stderr)
            return 2
    deployments = {}
    rows = []
    try:
        for kind in servers:
            deployments[kind] = _start_deployment(kind, args, flags, tasks)
        per_round = max(1, args.requests // args.rounds)
        for m, mix in enumerate(mixes):
            plan = mix_plan(mix, tasks, per_round, len(common["inputs"]), seed=m)
            stars = sum(k == "*" for k, _ in plan)
            parts: dict[str, list] = {kind: [] for kind in servers}
            loads: dict[str, list] = {kind: [] for kind in servers}
            for r in range(args.rounds):
                shift = (m + r) % len(servers)
                for kind in servers[shift:] + servers[:shift]:
                    processes, routes = deployments[kind]
                    before = loadavg()[0]
                    spec = LoadSpec(
                        routes=routes,
                        fan_out_star=kind == "naive",
                        plan=plan,
                        **(common | {"requests": per_round}),
                    )
                    parts[kind].append(run_load(spec))
                    loads[kind].append(before)
            for kind in servers:
                processes, _ = deployments[kind]
                done = parts[kind]
                result = LoadResult(
                    sum(x.requests for x in done),
                    sum(x.errors for x in done),
                    sum(x.seconds for x in done),
                    [ms for x in done for ms in x.latencies_ms],
                    [e for x in done for e in x.error_samples][:5],
                )
                memory = sum(p.memory()["peak_kib"] for p in processes.values())
                row = summarize(kind, result, memory, len(processes))
                row["mix"] = mix
                row["predictions_per_s"] = round(
                    args.rounds * (per_round - stars + stars * len(tasks)) / result.seconds, 1
                )
                row["loadavg_1min_per_round"] = loads[kind]
                rows.append(row)
                print(
                    f"{mix:<11} {kind:<14} {row['throughput_rps']:>8} req/s "
                    f"p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms errors {row['errors']} "
                    f"rss {row['server_peak_rss_mib']} MiB; load {loads[kind]}",
                    flush=True,
                )
    finally:
        for processes, _ in deployments.values():
            for proc in processes.values():
                proc.stop()
    errors = sum(r["errors"] for r in rows)
    parts_text = []
    for mix in mixes:
        by = {r["deployment"]: r for r in rows if r["mix"] == mix}
        if "fused" in by and len(by) > 1:
            others = ", ".join(
                f"{by['fused']['throughput_rps'] / r['throughput_rps']:.2f}x {k}"
                for k, r in by.items()
                if k != "fused"
            )
            parts_text.append(f"{mix}: fused {others}")
    summary = (
        f"serving mixes ({len(tasks)} tasks, {args.clients} clients, {args.requests} requests "
        f"each): {'; '.join(parts_text)}; errors {errors} (target 0)"
    )
    cols = ["mix", "deployment", "processes", "requests", "errors", "throughput_rps"]
    cols += ["predictions_per_s", "p50_ms", "p99_ms", "server_peak_rss_mib"]
    report = {
        "bench": "serving_load",
        "scenario": "mixes",
        "model": str(args.model),
        "tasks": tasks,
        "zipf_exponent": ZIPF_EXPONENT,
        "rows": rows,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "summary": summary,
    }
    write_report(args, "mixes", report)
    print_rows(rows, cols, summary)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving_load", description=__doc__)
    p.add_argument(
        "--scenario",
        choices=["fused-vs-naive", "ray", "overload", "hot-swap", "mixes", "protocols"],
        default="fused-vs-naive",
    )
    p.add_argument("--replicas", default="1,2", help="ray: replica counts to compare")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="ray: CPUs per replica")
    p.add_argument("--overload-factor", type=float, default=4.0, help="overload: x sustainable")
    p.add_argument("--max-queue", type=int, default=64, help="overload: the bounded run's limit")
    p.add_argument("--duration-s", type=float, default=10.0, help="overload/hot-swap: seconds")
    p.add_argument("--swaps", type=int, default=3, help="hot-swap: versions swapped in")
    p.add_argument("--mixes", default=",".join(MIXES), help="mixes: the task mixes to run")
    p.add_argument("--servers", default=",".join(SERVERS), help="mixes: the deployments")
    p.add_argument("--v2-rows", default="1,8", help="protocols: rows per ModelInfer to measure")
    p.add_argument(
        "--rounds", type=int, default=2, help="mixes: turns per deployment (requests split)"
    )
    p.add_argument("--model", type=Path, required=True, help="model dir (export.onnx --per-task)")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--warmup", type=int, default=500, help="requests sent before timing")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--max-batch-tokens", type=int, default=0, help="server flag (0: no cap)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="server flag (0: auto)")
    p.add_argument("--batches-in-flight", type=int, default=1, help="server flag (fused servers)")
    p.add_argument("--providers", default="cpu", choices=["auto", "cuda", "cpu"])
    p.add_argument("--no-naive", action="store_true", help="only measure the fused server")
    p.add_argument("--out", type=Path, default=RESULTS / "serving_load.json")
    args = p.parse_args(argv)

    spec = open_model_dir("bench.serving_load", args.model)
    if spec is None:
        return 2
    manifest = spec.manifest
    tasks = [t.name for t in spec.tasks]
    per_task = manifest.get("per_task") or {}
    run_naive = not args.no_naive and args.scenario == "fused-vs-naive"
    if args.scenario == "mixes" and "naive" in args.servers.split(","):
        run_naive = True
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

    if args.scenario == "overload":
        return scenario_overload(args, flags, common)
    if args.scenario == "hot-swap":
        return scenario_hot_swap(args, flags, common)
    if args.scenario == "ray":
        return scenario_ray(args, flags, common)
    if args.scenario == "mixes":
        return scenario_mixes(args, flags, common, tasks)
    if args.scenario == "protocols":
        return scenario_protocols(args, flags, common, tasks)
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
