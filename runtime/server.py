"""python -m runtime.server --model DIR: serve every task of an exported model over gRPC.

    python -m runtime.server --model runs/demo/onnx [--host 127.0.0.1] [--port 50051]
        [--max-batch 32] [--max-delay-ms 5] [--providers auto|cuda|cpu]
        [--tls-cert F --tls-key F] [--token-file F] [--max-message-mb 16] [--task NAME]
        [--max-queue N] [--metrics-port P] [--watch]

`--task NAME` serves one task from its `--per-task` graph (the naive one-process-per-task
deployment the serving benchmark compares against); `--group-by-task` keeps one task per
batch (what a server that switches adapters between batches does), another baseline.
Each batch sends every distinct input to the graph once: a `*` request is one input and one
row per task, and identical inputs within a batch window share their pass.
SIGTERM or SIGINT: health turns NOT_SERVING, new RPCs are refused, in-flight ones finish (up
to --grace-s), exit 0.

`--max-queue N`: at most N requests wait (preprocessing or queued); beyond, Predict fails at
once with RESOURCE_EXHAUSTED. `--metrics-port P`: Prometheus metrics at http://HOST:P/metrics
(runtime.metrics). `--model` may be a directory of numbered versions (runtime.versions): the
newest valid one is served; SIGHUP (or `--watch`, polling) loads a newer one beside the old,
verifies it and swaps it in between batches; a broken one is refused and the old keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.auth import BearerTokenInterceptor, read_token
from runtime.batcher import Batcher
from runtime.engine import PROVIDER_CHOICES, Engine, EngineError
from runtime.manifest import ModelDirError, load_model_dir
from runtime.preprocess import make_preprocessor
from runtime.service import InferenceModel, InferenceServicer, count_inputs, run_works
from runtime.versions import Candidate, VersionManager

log = logging.getLogger("runtime.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.server", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model dir written by export.onnx, or a dir of numbered versions (1/, 2/, ...)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (logged)")
    p.add_argument("--max-batch", type=int, default=32, help="most rows in one graph execution")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait to fill a batch")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="text: cap rows x longest row per batch (0: no cap)",
    )
    p.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    p.add_argument("--token-file", type=Path, help="require 'authorization: Bearer <token>'")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest request, MiB")
    p.add_argument("--task", help="serve only this task from its per-task graph (naive setup)")
    p.add_argument(
        "--group-by-task",
        action="store_true",
        help="benchmark baseline: one task per batch (a '*' runs as one job per task)",
    )
    p.add_argument("--workers", type=int, default=0, help="preprocessing threads (0: auto)")
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per batch (0: auto, the cores shared by the batches in flight)",
    )
    p.add_argument(
        "--batches-in-flight",
        type=int,
        default=1,
        help="batches executing at once (2: the next starts while one runs)",
    )
    p.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    p.add_argument(
        "--max-queue",
        type=int,
        default=0,
        help="most requests waiting; beyond, RESOURCE_EXHAUSTED at once (0: unbounded)",
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics at :PORT/metrics (0: any)"
    )
    p.add_argument("--metrics-host", help="address for --metrics-port (default: --host)")
    p.add_argument("--watch", action="store_true", help="poll --model for new versions")
    p.add_argument("--watch-interval-s", type=float, default=2.0, help="--watch poll period")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag errors the parser cannot see; raises ValueError with the fix."""
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} must be >= 1")
    if args.max_delay_ms < 0:
        raise ValueError(f"--max-delay-ms {args.max_delay_ms} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in 0..65535")
    if args.max_batch_tokens < 0:
        raise ValueError(f"--max-batch-tokens {args.max_batch_tokens} must be >= 0 (0: no cap)")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue {args.max_queue} must be >= 0 (0: unbounded)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ValueError(f"--metrics-port {args.metrics_port} must be in 0..65535")
    if args.watch_interval_s <= 0:
        raise ValueError(f"--watch-interval-s {args.watch_interval_s} must be > 0")
    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb {args.max_message_mb} must be > 0")
    if args.workers < 0 or args.intra_op_threads < 0:
        raise ValueError("--workers and --intra-op-threads must be >= 0")
    if args.batches_in_flight < 1:
        raise ValueError(f"--batches-in-flight {args.batches_in_flight} must be >= 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together; pass both or neither")
    for flag in ("tls_cert", "tls_key", "token_file"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: file not found")


@dataclass
class Runtime:
    """A started server and the pieces a caller may inspect or stop."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    batcher: Batcher
    pool: ThreadPoolExecutor
    servicer: InferenceServicer
    versions: VersionManager
    metrics: object | None = None  # runtime.metrics.Metrics when --metrics-port
    metrics_port: int | None = None
    watcher: asyncio.Task | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def model(self) -> InferenceModel:
        return self.servicer.model

    async def reload(self) -> bool:
        """Load the newest valid version beside the served one and swap it in; True when
        swapped. In-flight and queued requests finish on the model that accepted them."""
        async with self._reload_lock:
            refused = self.versions.refused
            found = await asyncio.to_thread(self.versions.reload)
            if self.metrics is not None and self.versions.refused > refused:
                self.metrics.reloads.labels(result="refused").inc(self.versions.refused - refused)
            if found is None:
                log.info("reload: %s stays served", self.model.describe())
                return False
            model, _ = found
            old = self.servicer.swap(model)
            if self.metrics is not None:
                self.metrics.reloads.labels(result="loaded").inc()
            log.info("reload: now serving %s (was %s)", model.describe(), old.describe())
            return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.versions.changed):
                    await self.reload()
            except Exception:  # the watcher must outlive any one bad look at the disk
                log.exception("--watch: reload failed")

    async def stop(self, grace: float | None = 30.0) -> None:
        """Drain: health NOT_SERVING and new Predicts refused while in-flight ones finish (up to
        `grace` s; health checks are still answered meanwhile), then stop and free threads."""
        if self.watcher is not None:
            self.watcher.cancel()
        await self.health.enter_graceful_shutdown()
        if not await self.servicer.drain(grace):
            log.warning("drain: in-flight requests still running after %s s; cancelling", grace)
        await self.server.stop(1.0)
        await self.batcher.close()
        self.pool.shutdown(wait=True)
        if self.metrics is not None:
            self.metrics.close()


def build_model(path: Path, version: int | None, args: argparse.Namespace) -> InferenceModel:
    """One model dir -> InferenceModel; ModelDirError/EngineError/ValueError on a bad dir."""
    spec = load_model_dir(path, task=args.task)
    pre = make_preprocessor(spec)
    threads = args.intra_op_threads
    in_flight = getattr(args, "batches_in_flight", 1)
    if not threads and in_flight > 1:  # the batches in flight share the cores
        threads = max(1, (os.cpu_count() or 1) // in_flight)
    engine = Engine(spec, pre, providers=args.providers, intra_op_threads=threads)
    return InferenceModel(spec, pre, engine, version)


def make_versions(args: argparse.Namespace) -> VersionManager:
    return VersionManager(args.model, lambda path, version: build_model(path, version, args))


def load_model(args: argparse.Namespace) -> InferenceModel:
    """`--model` -> the InferenceModel to serve (the newest valid version of a versions dir)."""
    return make_versions(args).initial()


async def start(args: argparse.Namespace, model: InferenceModel | None = None) -> Runtime:
    """Load the model (unless given), bind, start, and mark SERVING."""
    check_args(args)
    metrics = metrics_port = None
    if args.metrics_port is not None:  # bound first: a taken port fails before any loading
        from runtime.metrics import Metrics

        metrics = Metrics()
        metrics_port = metrics.serve(args.metrics_host or args.host, args.metrics_port)
    versions = make_versions(args)
    try:
        if model is None:
            model = await asyncio.to_thread(versions.initial)
        else:
            versions.adopt(model, Candidate(model.version, model.spec.root))
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    token = read_token(args.token_file) if args.token_file else None
    max_bytes = int(args.max_message_mb * 1024 * 1024)
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
    ]
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    workers = args.workers or min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
    batcher = Batcher(
        run_works,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        on_batch=metrics.on_batch if metrics is not None else None,
        count_inputs=count_inputs,
        in_flight=args.batches_in_flight,
    )
    servicer = InferenceServicer(
        model, batcher, pool, metrics, getattr(args, "group_by_task", False)
    )
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{args.host}:{args.port}"
    try:
        if args.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(args.tls_key.read_bytes(), args.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        if metrics is not None:
            metrics.close()
        raise ValueError(f"cannot listen on {address} ({e}); pick another --host/--port") from None
    if not port:
        if metrics is not None:
            metrics.close()
        raise ValueError(f"cannot listen on {address}; pick another --host/--port")
    batcher.start()
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    rt = Runtime(server, port, health_servicer, batcher, pool, servicer, versions, metrics)
    rt.metrics_port = metrics_port
    if args.watch:
        rt.watcher = asyncio.get_running_loop().create_task(rt.watch(args.watch_interval_s))
    return rt


async def serve(args: argparse.Namespace) -> int:
    rt = await start(args)
    spec = rt.model.spec
    log.info(
        "serving %s%s (%s, %d tasks: %s) on %s:%d%s%s, max-batch %d, max-delay %.1f ms, "
        "max-queue %s%s%s",
        spec.graph,
        "" if rt.model.version is None else f" (version {rt.model.version})",
        spec.modality,
        len(spec.tasks),
        ",".join(t.name for t in spec.tasks),
        args.host,
        rt.port,
        " with TLS" if args.tls_cert else "",
        " with token auth" if args.token_file else "",
        args.max_batch,
        args.max_delay_ms,
        args.max_queue or "unbounded",
        ""
        if rt.metrics_port is None
        else f", metrics at http://{args.metrics_host or args.host}:{rt.metrics_port}/metrics",
        f", watching {args.model} every {args.watch_interval_s:g} s" if args.watch else "",
    )
    if args.port_file:
        args.port_file.write_text(f"{rt.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: looking for a new model version in %s", args.model)
        task = loop.create_task(rt.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    log.info("signal received: draining in-flight requests (up to %.0f s)", args.grace_s)
    await rt.stop(args.grace_s)
    log.info("stopped: %s", rt.batcher.stats)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(args))
    except (ModelDirError, EngineError, ValueError, OSError) as e:
        print(f"runtime.server: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
