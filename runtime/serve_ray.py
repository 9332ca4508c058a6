"""python -m runtime.serve_ray: the same gRPC API on Ray Serve, across replicas and machines.

    python -m runtime.serve_ray --model DIR [--replicas N | --autoscale MIN,MAX]
        [--address local|auto|HOST:PORT|ray://HOST:PORT] [--port 9000] [--max-queue N]
        [--max-batch 32] [--max-delay-ms 5] [--replica-cpus 1] [--watch]

Ray Serve's gRPC proxy (one per node) serves `deepsurgery.v1.Inference` (Predict, ListTasks),
`grpc.health.v1.Health` and server reflection on `--port`, so every client of runtime.server
works unchanged. Two deployments make the application:

- `Model` (N replicas, or autoscaled): each replica is what runtime.server runs in-process:
  the model dir's fused graph on onnxruntime, the cross-task dynamic batcher and the
  preprocessing pool (runtime.service.Frontend). `--max-queue` bounds the requests queued for
  the replicas (Serve's max_queued_requests): beyond it, RESOURCE_EXHAUSTED.
- `Inference` (the gRPC ingress, light): forwards each call to a Model replica. Inference is
  pure, so a call whose replica died (a crash, a killed process) is retried on another replica;
  when none answers the client gets UNAVAILABLE (retryable), never a silent loss. Serve
  restarts dead replicas on its own.

`--address local` (default) starts a Ray on this machine; `auto` joins the Ray started here by
`ray start`; `HOST:PORT` joins a cluster's head (its GCS port, 6379); `ray://HOST:10001` connects
through Ray Client. The model dir must be at the same path on every node that runs a replica
(shared storage, or copied); each replica verifies its sha256 before serving. SIGHUP (or
`--watch`) loads the newest valid version of a versions dir in this process first and, when
it passes, rolls it out with Serve's rolling update; a broken version is refused here.
SIGTERM/SIGINT: the application is deleted (replicas drain) and a local Ray is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.engine import PROVIDER_CHOICES, EngineError
from runtime.manifest import ModelDirError

log = logging.getLogger("runtime.serve_ray")

INSTALL_HINT = "pip install 'deepsurgery[scale]' (or: pip install 'ray[serve]')"
ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
CODES = {c.value[0]: c for c in grpc.StatusCode}


class ScaleError(Exception):
    """A one-line error of this command (bad address, Ray missing, deploy failure)."""


# ---------------------------------------------------------------- protobuf pickling


def install_proto_alias() -> None:
    """protoc names the messages' module `deepsurgery.v1.inference_pb2` (the proto package);
    Ray pickles requests between the proxy and replicas, so that name must import."""
    import protos.deepsurgery
    import protos.deepsurgery.v1

    sys.modules.setdefault("deepsurgery", protos.deepsurgery)
    sys.modules.setdefault("deepsurgery.v1", protos.deepsurgery.v1)
    sys.modules.setdefault("deepsurgery.v1.inference_pb2", pb)


install_proto_alias()


def add_inference_servicer(servicer, server) -> None:
    """For gRPCOptions.grpc_servicer_functions (imported by each Serve proxy)."""
    install_proto_alias()
    pb_grpc.add_InferenceServicer_to_server(servicer, server)


def add_health_servicer(servicer, server) -> None:
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


SERVICER_FUNCTIONS = [
    "runtime.serve_ray.add_inference_servicer",
    "runtime.serve_ray.add_health_servicer",
]


class RawMessage:
    """An already-serialized protobuf: Serve calls SerializeToString() on what a gRPC method
    returns, so the replica's bytes reach the client without a parse and re-serialize."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf method name)
        return self.data


# ---------------------------------------------------------------- the deployments


class ModelReplica:
    """One Serve replica of the model: runtime.server's engine, batcher and preprocessing."""

    def __init__(self, model_path: str, version: int | None, options: dict):
        from runtime.batcher import Batcher
        from runtime.server import build_model
        from runtime.service import Frontend, count_inputs, run_works
        from runtime.versions import probe

        path = Path(model_path)
        if not path.is_dir():
            raise ModelDirError(
                f"{path}: not found on node {socket.gethostname()}; the model dir must be at "
                "the same path on every node (shared storage, or copy it there)"
            )
        args = Namespace(
            task=None,
            providers=options["providers"],
            intra_op_threads=options["intra_op_threads"],
        )
        self.model = build_model(path, version, args)
        probe(self.model)
        self.batcher = Batcher(
            run_works,
            max_batch=options["max_batch"],
            max_delay_ms=options["max_delay_ms"],
            max_tokens=options["max_batch_tokens"],
            count_inputs=count_inputs,
        )
        workers = options["workers"] or max(1, int(options["replica_cpus"]))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
        self.frontend = Frontend(self.model, self.batcher, self.pool)
        self._started = False
        logging.getLogger("ray.serve").info(
            "replica pid %d serving %s", os.getpid(), self.model.describe()
        )

    def _start(self) -> None:
        if not self._started:  # the batcher's task needs the replica's running event loop
            self.batcher.start()
            self._started = True

    async def predict(self, request: bytes) -> tuple[int, bytes | str]:
        """Serialized PredictRequest -> (0, serialized PredictResponse) or (code, message)."""
        self._start()
        code, message = await self.frontend.predict(pb.PredictRequest.FromString(request), None)
        if code is None:
            return 0, message.SerializeToString()
        return code.value[0], message

    async def list_tasks(self) -> bytes:
        return self.model.list_tasks().SerializeToString()

    async def info(self) -> dict:
        return {"pid": os.getpid(), "version": self.model.version, "node": socket.gethostname()}

    async def check_health(self) -> None:
        """Serve's periodic health check: a dead batcher means a replica that cannot answer."""
        task = self.batcher._task
        if task is not None and task.done():
            raise RuntimeError("the batcher stopped; this replica cannot answer")


class Ingress:
    """The gRPC-facing deployment: forwards to a Model replica, retrying on a lost replica."""

    def __init__(self, model_handle, retries: int = 3):
        self.model = model_handle
        self.retries = retries

    async def _call(self, method: str, *args):
        """(result, None) or (None, (code, message)) after retrying a lost replica."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        last = None
        for attempt in range(self.retries + 1):
            try:
                return await getattr(self.model, method).remote(*args), None
            except BackPressureError as e:
                return None, (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full: the model replicas' queue is at --max-queue ({e}); retry "
                    "with backoff or add replicas",
                )
            except (RayActorError, DeploymentUnavailableError) as e:
                last = e  # the replica died or is unreachable: inference is pure, so retry
                if attempt < self.retries:
                    logging.getLogger("ray.serve").warning(
                        "%s: model replica lost (%s); try %d of %d",
                        method,
                        type(e).__name__,
                        attempt + 2,
                        self.retries + 1,
                    )
                    await asyncio.sleep(0.05 * (attempt + 1))
        first = " ".join(str(last).split())[:200]
        return None, (
            grpc.StatusCode.UNAVAILABLE,
            f"no model replica answered after {self.retries + 1} tries ({type(last).__name__}: "
            f"{first}); retry",
        )

    @staticmethod
    def _fail(grpc_context, code: grpc.StatusCode, message: str) -> None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)

    async def Predict(self, request, grpc_context):  # noqa: N802 (the gRPC method name)
        result, error = await self._call("predict", request.SerializeToString())
        if error is None:
            code, payload = result
            if code == 0:
                return RawMessage(payload)
            error = CODES[code], payload
        self._fail(grpc_context, *error)
        return pb.PredictResponse()

    async def ListTasks(self, request, grpc_context):  # noqa: N802
        result, error = await self._call("list_tasks")
        if error is None:
            return RawMessage(result)
        self._fail(grpc_context, *error)
        return pb.ListTasksResponse()

    async def _status(self):
        from grpc_health.v1 import health_pb2

        try:
            await asyncio.wait_for(self.model.list_tasks.remote(), 5.0)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        except Exception:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(self, request, grpc_context):  # noqa: N802
        """grpc.health.v1: SERVING when a Model replica answers within 5 s."""
        return await self._status()

    async def Watch(self, request, grpc_context):  # noqa: N802
        yield await self._status()


# ---------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.serve_ray", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="model dir or dir of versions")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="Model replicas (default 1)")
    scale.add_argument("--autoscale", help="MIN,MAX: let Serve scale Model replicas")
    p.add_argument(
        "--address",
        default="local",
        help="local (start a Ray here), auto (the Ray started here), HOST:PORT, ray://HOST:PORT",
    )
    p.add_argument("--port", type=int, default=9000, help="gRPC port of the Serve proxies")
    p.add_argument("--http-port", type=int, default=0, help="Serve's HTTP port (0: any free)")
    p.add_argument("--name", default="deepsurgery", help="the Serve application name")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--max-batch-tokens", type=int, default=0)
    p.add_argument("--max-queue", type=int, default=0, help="requests queued for the replicas")
    p.add_argument(
        "--max-ongoing",
        type=int,
        default=0,
        help="requests one replica takes at once (0: 2x batch)",
    )
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--retries", type=int, default=3, help="tries on another replica if one dies")
    p.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto")
    p.add_argument(
        "--intra-op-threads", type=int, default=0, help="onnxruntime threads (0: --replica-cpus)"
    )
    p.add_argument("--workers", type=int, default=0, help="preprocessing threads per replica")
    p.add_argument("--num-cpus", type=int, help="local Ray only: CPUs it may use (default: all)")
    p.add_argument("--watch", action="store_true", help="roll out new versions as they appear")
    p.add_argument("--watch-interval-s", type=float, default=2.0)
    p.add_argument("--port-file", type=Path, help="write the gRPC port here once serving")
    p.add_argument("--status-file", type=Path, help="keep the replicas' pids/state here (JSON)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--autoscale {text!r} must be MIN,MAX (e.g. 1,4)") from None
    if not 0 <= lo <= hi or hi < 1:
        raise ValueError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def check_address(address: str) -> str:
    """Validate --address; for HOST:PORT forms, check the port answers (fast, clear error)."""
    if address in ("local", "auto"):
        return address
    m = ADDRESS.match(address)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ScaleError(
            f"--address {address!r}: use local, auto, HOST:PORT (the head's GCS, e.g. "
            "10.0.0.1:6379) or ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.1:10001)"
        )
    host = m["host"].strip("[]")
    try:
        with socket.create_connection((host, int(m["port"])), timeout=5):
            pass
    except OSError as e:
        raise ScaleError(
            f"--address {address}: cannot reach {host}:{m['port']} ({e.strerror or e}); is "
            "the Ray head running (ray start --head) and the port open?"
        ) from None
    _token_auth_for_join()
    return address


def _token_auth_for_join() -> None:
    """Ray clusters use token authentication by default; a driver joining by address only
    sends the token when RAY_AUTH_MODE=token. Turn it on when a token is at hand (as Ray does
    for the clusters it starts itself), so a join does not fail as 'cannot connect'."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("joining with Ray token authentication (RAY_AUTH_MODE=token)")


AUTH_HINT = (
    "if the cluster uses token authentication (Ray's default), give this machine the head's "
    "token: RAY_AUTH_TOKEN=... or ~/.ray/auth_token (see `ray get-auth-token` on the head)"
)


def check_args(args: argparse.Namespace) -> None:
    if args.autoscale:
        args.autoscale_range = parse_autoscale(args.autoscale)
    elif args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas} must be >= 1")
    for flag in ("max_batch", "ingress_replicas"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("max_queue", "max_ongoing", "max_batch_tokens", "retries", "workers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.max_delay_ms < 0 or args.replica_cpus < 0 or args.replica_gpus < 0:
        raise ValueError("--max-delay-ms, --replica-cpus and --replica-gpus must be >= 0")
    for flag in ("port", "http_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            raise ValueError(f"--{flag.replace('_', '-')} must be in 0..65535")
    if args.port == 0:
        raise ValueError("--port 0: Serve's gRPC proxies need a fixed port on every node")


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ScaleError(f"Ray Serve is not installed ({e}); {INSTALL_HINT}") from None
    return ray, serve


def replica_options(args: argparse.Namespace) -> dict:
    return {
        "providers": args.providers,
        "intra_op_threads": args.intra_op_threads or max(1, int(args.replica_cpus or 1)),
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay_ms,
        "max_batch_tokens": args.max_batch_tokens,
        "workers": args.workers,
        "replica_cpus": args.replica_cpus,
    }


def build_app(args: argparse.Namespace, model_path: Path, version: int | None):
    """The Serve application: Inference (gRPC ingress) -> Model replicas."""
    _, serve = import_ray()
    # By import path, not __main__'s copy (python -m): replicas must import this module, which
    # installs the protobuf alias they unpickle requests with.
    from runtime import serve_ray as this

    model_opts = {
        "name": "Model",
        "max_ongoing_requests": args.max_ongoing or 2 * args.max_batch,
        "max_queued_requests": args.max_queue or -1,
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 30,
    }
    if args.autoscale:
        lo, hi = args.autoscale_range
        model_opts["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": args.max_batch,
        }
    else:
        model_opts["num_replicas"] = args.replicas
    model = serve.deployment(this.ModelReplica).options(**model_opts)
    ingress = serve.deployment(this.Ingress).options(
        name="Inference",
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=100_000,  # a light forwarder: Model's limits are the real ones
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(
        model.bind(str(model_path.resolve()), version, replica_options(args)), args.retries
    )


def replicas(ray, app: str) -> list[dict]:
    """Live Serve replica actors of `app`: deployment, pid, state (Ray's GCS actor table)."""
    try:
        from ray._private.state import actors

        table = actors()
    except Exception:  # a private API: status is best-effort
        return []
    out = []
    for info in table.values():
        name = info.get("Name") or ""
        if not name.startswith(f"SERVE_REPLICA::{app}#"):
            continue
        out.append(
            {
                "deployment": name.split("#")[1],
                "actor": name,
                "pid": info.get("Pid"),
                "state": info.get("State"),
                "node": (info.get("Address") or {}).get("IPAddress"),
            }
        )
    return sorted(out, key=lambda r: (r["deployment"], r["actor"]))


def wait_until_serving(port: int, timeout: float = 120.0) -> None:
    """Until the local proxy routes ListTasks to a replica (the route table fills late)."""
    deadline = time.monotonic() + timeout
    last = None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.ListTasks(pb.ListTasksRequest(), timeout=5)
                return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {' '.join(str(e.details()).split())[:300]}"
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    break  # not a proxy still starting up: a broken deployment
                time.sleep(0.2)
    raise ScaleError(f"the Serve gRPC proxy on port {port} did not start answering ({last})")


class Deployer:
    """Owns the Ray connection and the application; reloads roll out new versions."""

    def __init__(self, args: argparse.Namespace):
        from runtime.server import build_model
        from runtime.versions import VersionManager

        self.args = args
        self.ray, self.serve = import_ray()
        # Versions are verified here first (sha256, parity record, a probe run on this
        # machine) so a broken one never reaches the replicas.
        opts = Namespace(task=None, providers="cpu", intra_op_threads=1)
        self.versions = VersionManager(args.model, lambda p, v: build_model(p, v, opts))
        self.version = None
        self.path = None

    def connect(self) -> None:
        ray, args = self.ray, self.args
        kw = {"logging_level": logging.WARNING, "log_to_driver": args.log_level == "DEBUG"}
        if args.address == "local":
            kw |= {"include_dashboard": False, "num_cpus": args.num_cpus}
            ray.init(address="local", **kw)  # always a new Ray, even if `ray start` ran here
        else:
            try:
                ray.init(address=args.address, **kw)
            except Exception as e:  # ConnectionError, RuntimeError, auth errors...
                first = " ".join(str(e).split())[:300]
                raise ScaleError(
                    f"--address {args.address}: cannot join Ray ({first}); {AUTH_HINT}"
                ) from None
        log.info(
            "Ray: %s, %s CPUs, %s nodes",
            args.address,
            ray.cluster_resources().get("CPU", 0),
            len([n for n in ray.nodes() if n.get("Alive")]),
        )

    def deploy(self, model, path: Path, version: int | None) -> None:
        from ray.serve.config import HTTPOptions, gRPCOptions

        args = self.args
        self.serve.start(
            grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
            http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
        )
        t0 = time.monotonic()
        self.serve.run(build_app(args, path, version), name=args.name, route_prefix=f"/{args.name}")
        wait_until_serving(args.port)
        self.version, self.path = version, path
        log.info(
            "serving %s on Ray Serve gRPC port %d (%s, %s; %.1f s)",
            model.describe(),
            args.port,
            f"autoscale {args.autoscale}" if args.autoscale else f"{args.replicas} replicas",
            f"max-queue {args.max_queue or 'unbounded'}",
            time.monotonic() - t0,
        )

    def start(self) -> None:
        model = self.versions.initial()
        self.connect()
        self.deploy(model, self.versions.current.path, self.versions.current.version)

    def reload(self) -> bool:
        found = self.versions.reload()
        if found is None:
            log.info("reload: version %s stays served", self.version)
            return False
        model, cand = found
        log.info("reload: rolling out %s (Serve rolling update)", model.describe())
        self.deploy(model, cand.path, cand.version)
        return True

    def status(self) -> dict:
        st = self.serve.status().applications.get(self.args.name)
        return {
            "app": self.args.name,
            "status": _name(st.status) if st else "MISSING",
            "version": self.version,
            "path": str(self.path),
            "deployments": {
                name: {"status": _name(d.status), "replica_states": dict(d.replica_states)}
                for name, d in (st.deployments.items() if st else [])
            },
            "replicas": replicas(self.ray, self.args.name),
        }

    def stop(self) -> None:
        if not self.ray.is_initialized():
            return
        try:
            if self.version is not None or self.path is not None:
                self.serve.delete(self.args.name)
            if self.args.address == "local":
                self.serve.shutdown()
        except Exception as e:  # stopping must not hide why we stop
            log.warning("stopping Serve: %s", " ".join(str(e).split())[:200])
        finally:
            self.ray.shutdown()


def _name(status) -> str:
    return str(getattr(status, "value", status))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def serve_forever(args: argparse.Namespace) -> int:
    deployer = Deployer(args)
    stop = {"signal": None}
    reload_requested = {"flag": False}
    try:
        deployer.start()
        # After ray.init, which installs handlers of its own.
        signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
        signal.signal(signal.SIGINT, lambda s, f: stop.update(signal=s))
        signal.signal(signal.SIGHUP, lambda s, f: reload_requested.update(flag=True))
        if args.port_file:
            args.port_file.write_text(f"{args.port}\n")
        last_status, next_watch = None, time.monotonic() + args.watch_interval_s
        while stop["signal"] is None:
            status = deployer.status()
            summary = {k: v["replica_states"] for k, v in status["deployments"].items()}
            if summary != last_status:
                log.info("Serve: %s %s", status["status"], summary)
                last_status = summary
            if args.status_file:
                write_json(args.status_file, status)
            if reload_requested["flag"]:
                reload_requested["flag"] = False
                log.info("SIGHUP: looking for a new model version in %s", args.model)
                deployer.reload()
            elif args.watch and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + args.watch_interval_s
                if deployer.versions.changed():
                    deployer.reload()
            time.sleep(0.5)
        log.info("signal %d: deleting the application (replicas drain)", stop["signal"])
    finally:
        deployer.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        check_args(args)
        check_address(args.address)
        import_ray()
        return serve_forever(args)
    except (ScaleError, ModelDirError, EngineError, ValueError, OSError) as e:
        print(f"runtime.serve_ray: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
