"""python -m runtime.server --model DIR: serve every task of an exported model over gRPC.

    python -m runtime.server --model runs/demo/onnx [--host 127.0.0.1] [--port 50051]
        [--max-batch 32] [--max-delay-ms 5] [--providers auto|cuda|cpu]
        [--tls-cert F --tls-key F] [--token-file F] [--max-message-mb 16] [--task NAME]
        [--max-queue N] [--metrics-port P] [--watch] [--protocols deepsurgery.v1,open-inference]

One port serves every protocol of runtime.protocols (all by default): deepsurgery.v1.Inference
(Predict, ListTasks) and the Open Inference Protocol (`inference.GRPCInferenceService`, what
KServe and Triton clients speak: each task is a model named after it), beside grpc.health.v1
and server reflection. Both are thin adapters of one runtime.core.Core, so their requests share
batches. `ServerOptions` (one typed object) builds a server; the CLI only parses into it.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime import protocols
from runtime.auth import BearerTokenInterceptor, read_token
from runtime.batcher import Batcher
from runtime.core import Core, InferenceModel, count_inputs, run_works
from runtime.engine import PROVIDER_CHOICES, Engine, EngineError
from runtime.manifest import ModelDirError, load_model_dir
from runtime.preprocess import make_preprocessor
from runtime.versions import Candidate, VersionManager

log = logging.getLogger("runtime.server")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_core_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of what one core is built from (model, batching, engine, protocols, reloads):
    runtime.server's and every runtime.serve_ray replica's."""
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model dir written by export.onnx, or a dir of numbered versions (1/, 2/, ...)",
    )
    p.add_argument("--max-batch", type=int, default=32, help="most rows in one graph execution")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait to fill a batch")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="text: cap rows x longest row per batch (0: no cap)",
    )
    p.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto")
    p.add_argument("--workers", type=int, default=0, help="preprocessing threads (0: auto)")
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per batch (0: auto)",
    )
    p.add_argument(
        "--protocols",
        type=comma_list,
        default=tuple(protocols.PROTOCOLS),
        help=f"served APIs, comma-separated (default: all: {','.join(protocols.PROTOCOLS)})",
    )
    p.add_argument("--watch", action="store_true", help="poll --model for new versions")
    p.add_argument("--watch-interval-s", type=float, default=2.0, help="--watch poll period")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m runtime.server", description=__doc__.splitlines()[0])
    add_core_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (logged)")
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
    return p


@dataclass(frozen=True)
class ServerOptions:
    """Everything that builds a server (or one runtime.serve_ray replica's core); the CLI's
    flags by name. `check()` raises ValueError naming the flag and the fix."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_batch_tokens: int = 0
    providers: str = "auto"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    max_message_mb: float = 16.0
    task: str | None = None
    group_by_task: bool = False
    workers: int = 0
    intra_op_threads: int = 0
    batches_in_flight: int = 1
    grace_s: float = 30.0
    max_queue: int = 0
    metrics_port: int | None = None
    metrics_host: str | None = None
    protocols: tuple[str, ...] = tuple(protocols.PROTOCOLS)
    watch: bool = False
    watch_interval_s: float = 2.0
    port_file: Path | None = None
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerOptions:
        """The parsed flags that are options (others, e.g. a wrapper's own, are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        """Flag errors the parser cannot see."""
        check_core_options(self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} must be in 0..65535")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue {self.max_queue} must be >= 0 (0: unbounded)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} must be in 0..65535")
        if self.max_message_mb <= 0:
            raise ValueError(f"--max-message-mb {self.max_message_mb} must be > 0")
        if self.batches_in_flight < 1:
            raise ValueError(f"--batches-in-flight {self.batches_in_flight} must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together; pass both or neither")
        for flag in ("tls_cert", "tls_key", "token_file"):
            path = getattr(self, flag)
            if path is not None and not path.is_file():
                raise ValueError(f"--{flag.replace('_', '-')} {path}: file not found")


def check_core_options(o) -> None:
    """The checks of add_core_arguments' flags (runtime.serve_ray's options have them too)."""
    if o.max_batch < 1:
        raise ValueError(f"--max-batch {o.max_batch} must be >= 1")
    if o.max_delay_ms < 0:
        raise ValueError(f"--max-delay-ms {o.max_delay_ms} must be >= 0")
    if o.max_batch_tokens < 0:
        raise ValueError(f"--max-batch-tokens {o.max_batch_tokens} must be >= 0 (0: no cap)")
    if o.workers < 0 or o.intra_op_threads < 0:
        raise ValueError("--workers and --intra-op-threads must be >= 0")
    if o.watch_interval_s <= 0:
        raise ValueError(f"--watch-interval-s {o.watch_interval_s} must be > 0")
    protocols.select(o.protocols)


@dataclass
class Runtime:
    """A started server and the pieces a caller may inspect or stop."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    core: Core
    versions: VersionManager
    services: list[str]  # the gRPC services answered for health checks
    metrics: object | None = None  # runtime.metrics.Metrics when --metrics-port
    metrics_port: int | None = None
    watcher: asyncio.Task | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def model(self) -> InferenceModel:
        return self.core.model

    @property
    def batcher(self) -> Batcher:
        return self.core.batcher

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
            old = self.core.swap(model)
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
        """Drain: health NOT_SERVING and new requests refused while in-flight ones finish (up
        to `grace` s; health checks are still answered meanwhile), then stop and free threads."""
        if self.watcher is not None:
            self.watcher.cancel()
        await self.health.enter_graceful_shutdown()
        if not await self.core.drain(grace):
            log.warning("drain: in-flight requests still running after %s s; cancelling", grace)
        await self.server.stop(1.0)
        await self.core.close()
        if self.metrics is not None:
            self.metrics.close()


def build_model(path: Path, version: int | None, options: ServerOptions) -> InferenceModel:
    """One model dir -> InferenceModel; ModelDirError/EngineError/ValueError on a bad dir."""
    spec = load_model_dir(path, task=options.task)
    pre = make_preprocessor(spec)
    threads = options.intra_op_threads
    if not threads and options.batches_in_flight > 1:  # the batches in flight share the cores
        threads = max(1, (os.cpu_count() or 1) // options.batches_in_flight)
    engine = Engine(spec, pre, providers=options.providers, intra_op_threads=threads)
    return InferenceModel(spec, pre, engine, version)


def build_core(model: InferenceModel, options: ServerOptions, metrics=None) -> Core:
    """The model's batcher, preprocessing pool and core (start it in the serving loop)."""
    workers = options.workers or min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
    batcher = Batcher(
        run_works,
        max_batch=options.max_batch,
        max_delay_ms=options.max_delay_ms,
        max_tokens=options.max_batch_tokens,
        max_queue=options.max_queue,
        on_batch=metrics.on_batch if metrics is not None else None,
        count_inputs=count_inputs,
        in_flight=options.batches_in_flight,
    )
    return Core(model, batcher, pool, metrics, options.group_by_task)


def make_versions(options: ServerOptions) -> VersionManager:
    return VersionManager(options.model, lambda path, version: build_model(path, version, options))


def load_model(options: ServerOptions) -> InferenceModel:
    """`--model` -> the InferenceModel to serve (the newest valid version of a versions dir)."""
    return make_versions(options).initial()


def _bind(server: grpc.aio.Server, options: ServerOptions) -> int:
    address = f"{options.host}:{options.port}"
    try:
        if options.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ValueError(f"cannot listen on {address} ({e}); pick another --host/--port") from None
    if not port:
        raise ValueError(f"cannot listen on {address}; pick another --host/--port")
    return port


async def start(options: ServerOptions, model: InferenceModel | None = None) -> Runtime:
    """Load the model (unless given), bind, start, and mark SERVING."""
    options.check()
    served = protocols.select(options.protocols)
    metrics = metrics_port = core = None
    if options.metrics_port is not None:  # bound first: a taken port fails before any loading
        from runtime.metrics import Metrics

        metrics = Metrics()
        metrics_port = metrics.serve(options.metrics_host or options.host, options.metrics_port)
    try:
        versions = make_versions(options)
        if model is None:
            model = await asyncio.to_thread(versions.initial)
        else:
            versions.adopt(model, Candidate(model.version, model.spec.root))
        token = read_token(options.token_file) if options.token_file else None
        max_bytes = int(options.max_message_mb * 1024 * 1024)
        grpc_options = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [BearerTokenInterceptor(token)] if token else []
        server = grpc.aio.server(options=grpc_options, interceptors=interceptors)
        core = build_core(model, options, metrics)
        for protocol in served:
            protocol.add_to_server(protocols.aio_servicer(protocol, protocol.adapter(core)), server)
        services = [p.service for p in served]
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *services):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        port = _bind(server, options)
    except BaseException:
        if core is not None:
            core.pool.shutdown(wait=False)
        if metrics is not None:
            metrics.close()
        raise
    core.start()
    await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    rt = Runtime(server, port, health_servicer, core, versions, services, metrics, metrics_port)
    if options.watch:
        rt.watcher = asyncio.get_running_loop().create_task(rt.watch(options.watch_interval_s))
    return rt


async def serve(options: ServerOptions) -> int:
    rt = await start(options)
    spec = rt.model.spec
    log.info(
        "serving %s%s (%s, %d tasks: %s) on %s:%d%s%s (%s), max-batch %d, max-delay %.1f ms, "
        "max-queue %s%s%s",
        spec.graph,
        "" if rt.model.version is None else f" (version {rt.model.version})",
        spec.modality,
        len(spec.tasks),
        ",".join(t.name for t in spec.tasks),
        options.host,
        rt.port,
        " with TLS" if options.tls_cert else "",
        " with token auth" if options.token_file else "",
        ", ".join(rt.services),
        options.max_batch,
        options.max_delay_ms,
        options.max_queue or "unbounded",
        ""
        if rt.metrics_port is None
        else f", metrics at http://{options.metrics_host or options.host}:{rt.metrics_port}"
        "/metrics",
        f", watching {options.model} every {options.watch_interval_s:g} s" if options.watch else "",
    )
    if options.port_file:
        options.port_file.write_text(f"{rt.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: looking for a new model version in %s", options.model)
        task = loop.create_task(rt.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    log.info("signal received: draining in-flight requests (up to %.0f s)", options.grace_s)
    await rt.stop(options.grace_s)
    log.info("stopped: %s", rt.batcher.stats)
    return 0


def cli(prog: str, parser: argparse.ArgumentParser, run: Callable, argv: list[str] | None) -> int:
    """Parse, set up logging, run; a known error is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except (ModelDirError, EngineError, ValueError, OSError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(serve(ServerOptions.from_args(args)))

    return cli("runtime.server", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
