"""runtime.serve_ray on a local Ray (one per module, 2 Model replicas): the same answers as
runtime.server, health and reflection, a replica killed under load, a version rolled out on
SIGHUP; and its one-line CLI errors (no Ray started for those)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_testkit import (
    REPO,
    WORDS,
    ServerThread,
    make_text_model_dir,
    run_oip_client,
    softmax,
    text_request,
)

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

NEW_TASKS = {"topic": ["World", "Sports", "Business"], "tone": ["negative", "positive"]}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    def __init__(self, models: Path, tmp: Path):
        self.port = free_port()
        self.status_file = tmp / "status.json"
        port_file = tmp / "port"
        self.log = open(tmp / "serve_ray.log", "w+")
        cmd = [sys.executable, "-m", "runtime.serve_ray", "--model", str(models)]
        cmd += ["--replicas", "2", "--port", str(self.port), "--num-cpus", "4"]
        cmd += ["--providers", "cpu", "--port-file", str(port_file)]
        cmd += ["--max-queue", "4", "--max-ongoing", "4"]
        cmd += ["--status-file", str(self.status_file)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"serve_ray did not start:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        self.addr = f"127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def status(self) -> dict:
        return json.loads(self.status_file.read_text())

    def model_pids(self) -> list[int]:
        return [
            r["pid"]
            for r in self.status()["replicas"]
            if r["deployment"] == "Model" and r["state"] == "ALIVE"
        ]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    pytest.importorskip("ray.serve")
    tmp = tmp_path_factory.mktemp("serve_ray")
    models = tmp / "models"
    make_text_model_dir(models / "1", per_task=False)
    server = RayServer(models, tmp)
    yield server, models
    code = server.stop()
    out = server.output()
    server.log.close()
    assert code == 0, out[-3000:]


def stub_of(addr: str) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(grpc.insecure_channel(addr))


def test_same_answers_health_and_reflection_as_runtime_server(ray_server):
    server, models = ray_server
    ray_stub = stub_of(server.addr)
    requests = [
        text_request(task, text, top_k=k)
        for task, text, k in [
            ("news", "stocks rallied", 2),
            ("stars", "terrible food", 5),
            ("*", "the team won the game", 1),
            ("*", "great movie", 3),
        ]
    ]
    with ServerThread(models / "1") as local:
        plain = local.stub()
        for req in requests:
            a, b = plain.Predict(req, timeout=30), ray_stub.Predict(req, timeout=30)
            assert [p.task for p in a.predictions] == [p.task for p in b.predictions]
            for pa, pb_ in zip(a.predictions, b.predictions, strict=True):
                assert pa.label == pb_.label and [t.label for t in pa.top] == [
                    t.label for t in pb_.top
                ]
                assert pa.logits == pytest.approx(pb_.logits, abs=1e-5)
        want_tasks = plain.ListTasks(pb.ListTasksRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as local_err:
            plain.Predict(text_request("nope", "x"), timeout=10)
    assert ray_stub.ListTasks(pb.ListTasksRequest(), timeout=30) == want_tasks
    with pytest.raises(grpc.RpcError) as ray_err:
        ray_stub.Predict(text_request("nope", "x"), timeout=30)
    assert ray_err.value.code() == local_err.value.code() == grpc.StatusCode.NOT_FOUND
    assert ray_err.value.details() == local_err.value.details()

    channel = grpc.insecure_channel(server.addr)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "deepsurgery.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= services


def test_tritonclient_gets_the_same_answers_through_ray(ray_server, tmp_path):
    server, _ = ray_server
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}" for i in range(32)]
    infer = {"model": "news", "input": "text", "datatype": "BYTES", "encoding": "text"}
    spec = {
        "models": ["news", "stars"],
        "infer": [{**infer, "rows": texts}, {**infer, "model": "nope", "rows": ["x"]}],
    }
    report = run_oip_client(server.addr, spec, tmp_path)
    stub = stub_of(server.addr)
    want = [stub.Predict(text_request("news", t), timeout=30).predictions[0] for t in texts]
    assert report["live"] and report["ready"] and report["models"]["stars"]["ready"]
    assert report["models"]["news"]["metadata"]["versions"] == ["1"]
    outputs = report["results"][0]["outputs"]
    assert outputs["label"]["data"] == [p.label for p in want]
    expected = np.stack([softmax(p.logits) for p in want])
    np.testing.assert_allclose(outputs["probabilities"]["data"], expected, atol=1e-5)
    error = report["results"][1]["error"]
    assert error["code"] == "NOT_FOUND" and "unknown model 'nope'" in error["message"]


def test_max_queue_refuses_a_burst_with_resource_exhausted(ray_server):
    import asyncio

    server, _ = ray_server

    async def burst() -> list:
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(i: int):
                try:
                    await stub.Predict(text_request("*", f"the game {i}"), timeout=60)
                    return "OK", ""
                except grpc.RpcError as e:
                    return e.code().name, e.details()

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(burst())
    codes = {c for c, _ in results}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    refused = [d for c, d in results if c == "RESOURCE_EXHAUSTED"]
    assert refused and all("queue full" in d for d in refused)
    assert len(refused) < len(results)  # the ones that fit were answered


def test_killed_replica_loses_no_request_and_comes_back(ray_server):
    server, _ = ray_server
    stub = stub_of(server.addr)
    pids = server.model_pids()
    assert len(pids) == 2
    stop = threading.Event()
    ok, failures = [0], []

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                stub.Predict(text_request("*", f"the game {c} {i}"), timeout=30)
                ok[0] += 1
            except grpc.RpcError as e:
                failures.append((e.code(), e.details()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        before = ok[0]
        os.kill(pids[0], signal.SIGKILL)  # mid-load: requests are in flight on it
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert before > 0 and ok[0] > before
    # Every request was answered, or told to retry; none was lost or failed for good.
    assert all(code in RETRYABLE for code, _ in failures), failures[:3]
    deadline = time.monotonic() + 90
    while True:
        alive = server.model_pids()
        status = server.status()["deployments"]["Model"]["replica_states"]
        if len(alive) == 2 and pids[0] not in alive and status == {"RUNNING": 2}:
            break
        assert time.monotonic() < deadline, (alive, status)
        time.sleep(0.5)
    assert stub.Predict(text_request("news", "market"), timeout=30).predictions
    assert "Serve: UNHEALTHY" in server.output() or "STARTING" in server.output()


def test_sighup_rolls_out_a_new_version_and_refuses_a_broken_one(ray_server):
    server, models = ray_server
    stub = stub_of(server.addr)
    broken = models / ".tmp-3"
    shutil.copytree(models / "1", broken)
    with open(broken / "model.onnx", "ab") as f:
        f.write(b"\0")
    os.replace(broken, models / "3")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "model version 3 refused" not in server.output():
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.2)
    assert [t.name for t in stub.ListTasks(pb.ListTasksRequest(), timeout=30).tasks] == [
        "news",
        "stars",
    ]
    shutil.rmtree(models / "3")
    tmp = models / ".tmp-2"
    make_text_model_dir(tmp, tasks=NEW_TASKS, per_task=False, seed=1)
    os.replace(tmp, models / "2")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while True:
        names = [t.name for t in stub.ListTasks(pb.ListTasksRequest(), timeout=30).tasks]
        if names == list(NEW_TASKS) and server.status()["version"] == 2:
            break
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.5)
    assert stub.Predict(text_request("tone", "great"), timeout=30).predictions[0].task == "tone"


# ---------------------------------------------------------------- CLI errors, no Ray started


def run_cli(*args: str, launcher: str | None = None) -> subprocess.CompletedProcess:
    head = ["-c", launcher] if launcher else ["-m", "runtime.serve_ray"]
    return subprocess.run(
        [sys.executable, *head, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def one_line_exit_2(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_errors_are_one_line(text_model_dir):
    model = str(text_model_dir)
    one_line_exit_2(run_cli("--model", model, "--address", "not an address"), "--address")
    port = free_port()  # nothing listens there
    result = run_cli("--model", model, "--address", f"127.0.0.1:{port}")
    one_line_exit_2(result, "cannot reach")
    one_line_exit_2(run_cli("--model", model, "--address", f"ray://127.0.0.1:{port}"), "reach")
    one_line_exit_2(run_cli("--model", model, "--autoscale", "3,1"), "--autoscale")
    one_line_exit_2(run_cli("--model", model, "--replicas", "0"), "--replicas")
    one_line_exit_2(run_cli("--model", model, "--port", "0"), "--port 0")


def test_ray_missing_names_the_extra_and_plain_server_needs_no_ray(text_model_dir):
    blocked = "import sys; sys.modules['ray'] = None; from runtime import serve_ray; "
    result = run_cli(
        "--model",
        str(text_model_dir),
        launcher=blocked + "sys.argv[0] = 'x'; sys.exit(serve_ray.main(sys.argv[1:]))",
    )
    one_line_exit_2(result, "Ray Serve is not installed")
    assert "deepsurgery[scale]" in result.stderr
    check = (
        "import sys; sys.modules['ray'] = None\n"
        "import runtime.server, runtime.client, runtime.metrics, runtime.versions\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ray' and sys.modules[m]]\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
