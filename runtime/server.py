"""python -m runtime.server --model DIR: serve every task of an exported model over gRPC.

    python -m runtime.server --model runs/demo/onnx [--host 127.0.0.1] [--port 50051]
        [--max-batch 32] [--max-delay-ms 5] [--providers auto|cuda|cpu]
        [--tls-cert F --tls-key F] [--token-file F] [--max-message-mb 16] [--task NAME]

`--task NAME` serves one task from its `--per-task` graph (the naive one-process-per-task
deployment the serving benchmark compares against). SIGTERM or SIGINT: health turns
NOT_SERVING, new RPCs are refused, in-flight ones finish (up to --grace-s), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from runtime.service import InferenceModel, InferenceServicer

log = logging.getLogger("runtime.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.server", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="model dir written by export.onnx")
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
    p.add_argument("--workers", type=int, default=0, help="preprocessing threads (0: auto)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (0: auto)")
    p.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
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
    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb {args.max_message_mb} must be > 0")
    if args.workers < 0 or args.intra_op_threads < 0:
        raise ValueError("--workers and --intra-op-threads must be >= 0")
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
    model: InferenceModel
    servicer: InferenceServicer

    async def stop(self, grace: float | None = 30.0) -> None:
        """Drain: health NOT_SERVING and new Predicts refused while in-flight ones finish (up to
        `grace` s; health checks are still answered meanwhile), then stop and free threads."""
        await self.health.enter_graceful_shutdown()
        if not await self.servicer.drain(grace):
            log.warning("drain: in-flight requests still running after %s s; cancelling", grace)
        await self.server.stop(1.0)
        await self.batcher.close()
        self.pool.shutdown(wait=True)


def load_model(args: argparse.Namespace) -> InferenceModel:
    """Model dir -> InferenceModel; ModelDirError/EngineError/ValueError on a bad dir."""
    spec = load_model_dir(args.model, task=args.task)
    pre = make_preprocessor(spec)
    engine = Engine(spec, pre, providers=args.providers, intra_op_threads=args.intra_op_threads)
    return InferenceModel(spec, pre, engine)


async def start(args: argparse.Namespace, model: InferenceModel | None = None) -> Runtime:
    """Load the model (unless given), bind, start, and mark SERVING."""
    check_args(args)
    model = model or load_model(args)
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
        model.run_batch,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_tokens=args.max_batch_tokens,
    )
    servicer = InferenceServicer(model, batcher, pool)
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
        raise ValueError(f"cannot listen on {address} ({e}); pick another --host/--port") from None
    if not port:
        raise ValueError(f"cannot listen on {address}; pick another --host/--port")
    batcher.start()
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Runtime(server, port, health_servicer, batcher, pool, model, servicer)


async def serve(args: argparse.Namespace) -> int:
    rt = await start(args)
    spec = rt.model.spec
    log.info(
        "serving %s (%s, %d tasks: %s) on %s:%d%s%s, max-batch %d, max-delay %.1f ms",
        spec.graph,
        spec.modality,
        len(spec.tasks),
        ",".join(t.name for t in spec.tasks),
        args.host,
        rt.port,
        " with TLS" if args.tls_cert else "",
        " with token auth" if args.token_file else "",
        args.max_batch,
        args.max_delay_ms,
    )
    if args.port_file:
        args.port_file.write_text(f"{rt.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
