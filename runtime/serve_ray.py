"""python -m runtime.serve_ray: the same gRPC API on Ray Serve, across replicas and machines.

    python -m runtime.serve_ray --model DIR [--replicas N | --autoscale MIN,MAX]
        [--address local|auto|HOST:PORT|ray://HOST:PORT] [--port 9000] [--max-queue N]
        [--max-batch 32] [--max-delay-ms 5] [--replica-cpus 1] [--watch]

Ray Serve's gRPC proxy (one per node) serves every protocol of runtime.protocols on `--port`,
as runtime.server does (`deepsurgery.v1.Inference` and the Open Inference Protocol's
`inference.GRPCInferenceService`), with `grpc.health.v1.Health` and server reflection, so every
client of runtime.server works unchanged. Two deployments make the application:

- `Model` (N replicas, or autoscaled): each replica is what runtime.server runs in-process,
  built by the same functions from the same `ServerOptions`: the model dir's fused graph on
  onnxruntime, the core (runtime.core: cross-task dynamic batcher, preprocessing pool) and the
  protocol adapters. `--max-queue` bounds the requests queued for the replicas (Serve's
  max_queued_requests): beyond it, RESOURCE_EXHAUSTED.
- `Inference` (the gRPC ingress, light): forwards each call, serialized, to a Model replica.
  Inference is pure, so a call whose replica died (a crash, a killed process) is retried on
  another replica; when none answers the client gets UNAVAILABLE (retryable), never a silent
  loss. Serve restarts dead replicas on its own.

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
import importlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from runtime import protocols
from runtime.server import (
    Parser,
    ServerOptions,
    add_core_arguments,
    build_core,
    build_model,
    check_core_options,
    cli,
)

log = logging.getLogger("runtime.serve_ray")

INSTALL_HINT = "pip install 'deepsurgery[scale]' (or: pip install 'ray[serve]')"
ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
REGISTRY_NAMESPACE = "deepsurgery"


class ScaleError(ValueError):
    """A one-line error of this command (bad address, Ray missing, deploy failure)."""


# ---------------------------------------------------------------- protobuf pickling


def install_proto_aliases() -> None:
    """protoc names each messages module after its proto file (`deepsurgery.v1.inference_pb2`,
    `inference.grpc_predict_v2_pb2`); Ray pickles requests between the proxy and the ingress,
    so those names must import: alias them (and their packages) to the modules under protos."""
    for protocol in protocols.PROTOCOLS.values():
        module = protocol.messages
        parts = module.DESCRIPTOR.name.removesuffix(".proto").split("/")
        for i in range(1, len(parts)):
            alias = ".".join(parts[:i])
            sys.modules.setdefault(alias, importlib.import_module(f"protos.{alias}"))
        sys.modules.setdefault(".".join(parts) + "_pb2", module)


install_proto_aliases()


def add_servicers(servicer, server) -> None:
    """For gRPCOptions.grpc_servicer_functions (imported by each Serve proxy): every protocol
    and grpc.health. The proxy routes each method to the ingress method of the same name."""
    from grpc_health.v1 import health_pb2_grpc

    install_proto_aliases()
    for protocol in protocols.PROTOCOLS.values():
        protocol.add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


SERVICER_FUNCTIONS = ["runtime.serve_ray.add_servicers"]


class RawMessage:
    """An already-serialized protobuf: Serve calls SerializeToString() on what a gRPC method
    returns, so the replica's bytes reach the client without a parse and re-serialize."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf method name)
        return self.data


# ---------------------------------------------------------------- the deployments


class ReplicaRegistry:
    """A small named Ray actor: Model replicas report their pid and node here, so the status
    file can name them (Serve's public status has states, not processes)."""

    def __init__(self):
        self.replicas: dict[str, dict] = {}

    def add(self, actor: str, info: dict) -> None:
        self.replicas[actor] = info

    def all(self) -> dict[str, dict]:
        return self.replicas


def registry_name(app: str) -> str:
    return f"{app}-replicas"


class ModelReplica:
    """One Serve replica of the model: runtime.server's model, core and protocol adapters."""

    def __init__(self, model_path: str, version: int | None, options: ServerOptions):
        from runtime.manifest import ModelDirError
        from runtime.versions import probe

        path = Path(model_path)
        if not path.is_dir():
            raise ModelDirError(
                f"{path}: not found on node {socket.gethostname()}; the model dir must be at "
                "the same path on every node (shared storage, or copy it there)"
            )
        self.model = build_model(path, version, options)
        probe(self.model)
        self.core = build_core(self.model, options)
        self.adapters = {p.name: p.adapter(self.core) for p in protocols.select(options.protocols)}
        self.grace_s = options.grace_s
        self._started = False
        self._register()
        logging.getLogger("ray.serve").info(
            "replica pid %d serving %s", os.getpid(), self.model.describe()
        )

    def _register(self) -> None:
        import ray
        from ray import serve

        try:
            context = serve.get_replica_context()
            registry = ray.get_actor(registry_name(context.app_name), namespace=REGISTRY_NAMESPACE)
        except (ValueError, RuntimeError):  # started by another driver: nobody to tell
            return
        info = {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}
        registry.add.remote(context.replica_id.to_full_id_str(), info)

    def _start(self) -> None:
        if not self._started:  # the batcher's task needs the replica's running event loop
            self.core.start()
            self._started = True

    async def call(self, protocol: str, method: str, payload: bytes):
        """One RPC, serialized: (None, response bytes) or (status name, message)."""
        self._start()
        adapter = self.adapters.get(protocol)
        if adapter is None:
            return "UNIMPLEMENTED", f"{protocol} is not served here (--protocols)"
        return await protocols.call(protocols.PROTOCOLS[protocol], adapter, method, payload)

    async def ready(self) -> bool:
        self._start()
        return self.core.info().ready

    async def check_health(self) -> None:
        """Serve's periodic health check: a dead batcher means a replica that cannot answer."""
        if self._started and not self.core.healthy:
            raise RuntimeError("the batcher stopped; this replica cannot answer")

    async def __del__(self):
        """Serve's graceful shutdown: the same drain and close as runtime.server's."""
        if getattr(self, "core", None) is None:  # __init__ failed: nothing was started
            return
        await self.core.drain(self.grace_s)
        await self.core.close()


class Ingress:
    """The gRPC-facing deployment: forwards to a Model replica, retrying on a lost replica.
    It has one method per RPC of every protocol (the proxy calls them by name)."""

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
                    "RESOURCE_EXHAUSTED",
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
            "UNAVAILABLE",
            f"no model replica answered after {self.retries + 1} tries ({type(last).__name__}: "
            f"{first}); retry",
        )

    async def forward(self, protocol: protocols.Protocol, method: str, request, grpc_context):
        result, error = await self._call("call", protocol.name, method, request.SerializeToString())
        if error is None:
            code, payload = result
            if code is None:
                return RawMessage(payload)
            error = code, payload
        grpc_context.set_code(grpc.StatusCode[error[0]])
        grpc_context.set_details(error[1])
        return protocol.response_type(method)()

    async def _status(self):
        from grpc_health.v1 import health_pb2

        try:
            ready = await asyncio.wait_for(self.model.ready.remote(), 5.0)
        except Exception:
            ready = False
        serving = health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse(
            status=serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(self, request, grpc_context):  # noqa: N802
        """grpc.health.v1: SERVING when a Model replica answers within 5 s."""
        return await self._status()

    async def Watch(self, request, grpc_context):  # noqa: N802
        yield await self._status()


def _forwarder(protocol: protocols.Protocol, method: str):
    async def rpc(self, request, grpc_context):
        return await self.forward(protocol, method, request, grpc_context)

    rpc.__name__ = rpc.__qualname__ = method
    return rpc


for _protocol in protocols.PROTOCOLS.values():
    for _method in _protocol.methods:
        setattr(Ingress, _method, _forwarder(_protocol, _method))


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m runtime.serve_ray", description=__doc__.splitlines()[0])
    add_core_arguments(p)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="Model replicas (default 1)")
    scale.add_argument("--autoscale", help="MIN,MAX: let Serve scale Model replicas")
    where = "local (start a Ray here), auto (the Ray started here), HOST:PORT, ray://HOST:PORT"
    p.add_argument("--address", default="local", help=where)
    p.add_argument("--port", type=int, default=9000, help="gRPC port of the Serve proxies")
    p.add_argument("--http-port", type=int, default=0, help="Serve's HTTP port (0: any free)")
    p.add_argument("--name", default="deepsurgery", help="the Serve application name")
    p.add_argument("--max-queue", type=int, default=0, help="requests queued for the replicas")
    ongoing = "requests one replica takes at once (0: 2x batch)"
    p.add_argument("--max-ongoing", type=int, default=0, help=ongoing)
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--retries", type=int, default=3, help="tries on another replica if one dies")
    p.add_argument("--num-cpus", type=int, help="local Ray only: CPUs it may use (default: all)")
    p.add_argument("--status-file", type=Path, help="keep the replicas' pids/state here (JSON)")
    return p


@dataclass(frozen=True)
class ScaleOptions:
    """Everything that builds the Serve application (the flags by name; no defaults here: the
    parser holds them). `replica` is the ServerOptions each Model replica's core is built from
    (and `--model`, `--watch`, `--port-file` of this command)."""

    replica: ServerOptions
    replicas: int
    autoscale: tuple[int, int] | None
    address: str
    port: int
    http_port: int
    name: str
    max_queue: int
    max_ongoing: int
    replica_cpus: float
    replica_gpus: float
    ingress_replicas: int
    retries: int
    num_cpus: int | None
    status_file: Path | None
    log_level: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScaleOptions:
        """The parsed flags; ValueError (one line) on values the parser cannot check."""
        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
        cpus = max(1, int(args.replica_cpus or 1))
        replica = replace(
            ServerOptions.from_args(args),
            max_queue=0,  # Serve bounds the replicas' queue (max_queued_requests)
            intra_op_threads=args.intra_op_threads or cpus,
            workers=args.workers or cpus,
        )
        return cls(
            replica=replica,
            autoscale=autoscale,
            **{
                f: getattr(args, f)
                for f in cls.__dataclass_fields__
                if f not in ("replica", "autoscale")
            },
        )

    def check(self) -> None:
        check_core_options(self.replica)
        if self.autoscale is None and self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas} must be >= 1")
        for flag in ("ingress_replicas",):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        for flag in ("max_queue", "max_ongoing", "retries"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be >= 0")
        for flag in ("port", "http_port"):
            if not 0 <= getattr(self, flag) <= 65535:
                raise ValueError(f"--{flag.replace('_', '-')} must be in 0..65535")
        if self.port == 0:
            raise ValueError("--port 0: Serve's gRPC proxies need a fixed port on every node")


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


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ScaleError(f"Ray Serve is not installed ({e}); {INSTALL_HINT}") from None
    return ray, serve


def build_app(options: ScaleOptions, model_path: Path, version: int | None):
    """The Serve application: Inference (gRPC ingress) -> Model replicas."""
    _, serve = import_ray()
    # By import path, not __main__'s copy (python -m): replicas must import this module, which
    # installs the protobuf aliases they unpickle requests with.
    from runtime import serve_ray as this

    model_opts = {
        "name": "Model",
        "max_ongoing_requests": options.max_ongoing or 2 * options.replica.max_batch,
        "max_queued_requests": options.max_queue or -1,
        "ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 30,
    }
    if options.autoscale:
        lo, hi = options.autoscale
        model_opts["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": options.replica.max_batch,
        }
    else:
        model_opts["num_replicas"] = options.replicas
    model = serve.deployment(this.ModelReplica).options(**model_opts)
    ingress = serve.deployment(this.Ingress).options(
        name="Inference",
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=100_000,  # a light forwarder: Model's limits are the real ones
        ray_actor_options={"num_cpus": 0},
    )
    replica = replace(options.replica, model=model_path.resolve())
    return ingress.bind(model.bind(str(replica.model), version, replica), options.retries)


def wait_until_serving(port: int, timeout: float = 120.0) -> None:
    """Until the local proxy's health check says SERVING (a replica answered; the proxy's
    route table fills late)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {' '.join(str(e.details()).split())[:300]}"
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    break  # not a proxy still starting up: a broken deployment
            time.sleep(0.2)
    raise ScaleError(f"the Serve gRPC proxy on port {port} did not start answering ({last})")


class Deployer:
    """Owns the Ray connection and the application; reloads roll out new versions."""

    def __init__(self, options: ScaleOptions):
        from runtime.server import make_versions

        self.options = options
        self.ray, self.serve = import_ray()
        # Versions are verified here first (sha256, parity record, a probe run on this
        # machine) so a broken one never reaches the replicas.
        here = replace(options.replica, providers="cpu", intra_op_threads=1)
        self.versions = make_versions(here)
        self.version = None
        self.path = None
        self.registry = None

    def connect(self) -> None:
        ray, options = self.ray, self.options
        kw = {"logging_level": logging.WARNING, "log_to_driver": options.log_level == "DEBUG"}
        if options.address == "local":
            kw |= {"include_dashboard": False, "num_cpus": options.num_cpus}
            ray.init(address="local", **kw)  # always a new Ray, even if `ray start` ran here
        else:
            try:
                ray.init(address=options.address, **kw)
            except Exception as e:  # ConnectionError, RuntimeError, auth errors...
                first = " ".join(str(e).split())[:300]
                raise ScaleError(
                    f"--address {options.address}: cannot join Ray ({first}); {AUTH_HINT}"
                ) from None
        self.registry = (
            ray.remote(ReplicaRegistry)
            .options(
                name=registry_name(options.name),
                namespace=REGISTRY_NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
            )
            .remote()
        )
        log.info(
            "Ray: %s, %s CPUs, %s nodes",
            options.address,
            ray.cluster_resources().get("CPU", 0),
            len([n for n in ray.nodes() if n.get("Alive")]),
        )

    def deploy(self, model, path: Path, version: int | None) -> None:
        from ray.serve.config import HTTPOptions, gRPCOptions

        options = self.options
        self.serve.start(
            grpc_options=gRPCOptions(port=options.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
            http_options=HTTPOptions(host="127.0.0.1", port=options.http_port),
        )
        t0 = time.monotonic()
        app = build_app(options, path, version)
        self.serve.run(app, name=options.name, route_prefix=f"/{options.name}")
        wait_until_serving(options.port)
        self.version, self.path = version, path
        log.info(
            "serving %s on Ray Serve gRPC port %d (%s; %s, %s; %.1f s)",
            model.describe(),
            options.port,
            ", ".join(options.replica.protocols),
            f"autoscale {options.autoscale}"
            if options.autoscale
            else f"{options.replicas} replicas",
            f"max-queue {options.max_queue or 'unbounded'}",
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

    def replicas(self) -> list[dict]:
        """Live Model replicas: the registry's reports, for the replica actors still named in
        Ray (a dead replica's actor is no longer listed). Best-effort, for the status file."""
        try:
            reports = self.ray.get(self.registry.all.remote(), timeout=5)
            alive = {a["name"] for a in self.ray.util.list_named_actors(all_namespaces=True)}
        except Exception:
            return []
        out = [
            {
                "deployment": actor.split("#")[1],
                "actor": actor,
                "pid": info["pid"],
                "state": "ALIVE",
                "node": info["node"],
            }
            for actor, info in reports.items()
            if actor in alive
        ]
        return sorted(out, key=lambda r: (r["deployment"], r["actor"]))

    def status(self) -> dict:
        st = self.serve.status().applications.get(self.options.name)
        return {
            "app": self.options.name,
            "status": _name(st.status) if st else "MISSING",
            "version": self.version,
            "path": str(self.path),
            "deployments": {
                name: {"status": _name(d.status), "replica_states": dict(d.replica_states)}
                for name, d in (st.deployments.items() if st else [])
            },
            "replicas": self.replicas(),
        }

    def stop(self) -> None:
        if not self.ray.is_initialized():
            return
        try:
            if self.version is not None or self.path is not None:
                self.serve.delete(self.options.name)
            if self.options.address == "local":
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


def serve_forever(options: ScaleOptions) -> int:
    deployer = Deployer(options)
    replica = options.replica
    stop = {"signal": None}
    reload_requested = {"flag": False}
    try:
        deployer.start()
        # After ray.init, which installs handlers of its own.
        signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
        signal.signal(signal.SIGINT, lambda s, f: stop.update(signal=s))
        signal.signal(signal.SIGHUP, lambda s, f: reload_requested.update(flag=True))
        if replica.port_file:
            replica.port_file.write_text(f"{options.port}\n")
        last_status, next_watch = None, time.monotonic() + replica.watch_interval_s
        while stop["signal"] is None:
            status = deployer.status()
            summary = {k: v["replica_states"] for k, v in status["deployments"].items()}
            if summary != last_status:
                log.info("Serve: %s %s", status["status"], summary)
                last_status = summary
            if options.status_file:
                write_json(options.status_file, status)
            if reload_requested["flag"]:
                reload_requested["flag"] = False
                log.info("SIGHUP: looking for a new model version in %s", replica.model)
                deployer.reload()
            elif replica.watch and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + replica.watch_interval_s
                if deployer.versions.changed():
                    deployer.reload()
            time.sleep(0.5)
        log.info("signal %d: deleting the application (replicas drain)", stop["signal"])
    finally:
        deployer.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        options = ScaleOptions.from_args(args)
        options.check()
        check_address(options.address)
        import_ray()
        return serve_forever(options)

    return cli("runtime.serve_ray", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
