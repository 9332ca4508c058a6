"""--max-queue (fail fast with RESOURCE_EXHAUSTED) and --metrics-port (a real GET of /metrics)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from runtime_testkit import REPO, ServerThread, text_request, wait_until


def slow(delay: float):
    """Model hook: every batch takes `delay` longer; `hook.running` is set once one has begun."""
    running = threading.Event()

    def hook(model):
        inner = model.run_batch

        def run_batch(works):
            running.set()
            time.sleep(delay)
            return inner(works)

        model.run_batch = run_batch

    hook.running = running
    return hook


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_max_queue_refuses_fast_and_server_stays_healthy(text_model_dir):
    hook = slow(0.4)
    with ServerThread(
        text_model_dir, "--max-batch", "1", "--max-queue", "2", model_hook=hook
    ) as server:
        stub = server.stub()
        blocker = stub.Predict.future(text_request("news", "the game"), timeout=10)
        assert hook.running.wait(10)  # the engine is busy with `blocker`; nothing waits
        wait_until(lambda: server.rt.batcher.waiting == 0)
        futures = [
            stub.Predict.future(text_request("*", f"game {i}"), timeout=10) for i in range(6)
        ]
        ok, refused = [], []
        for f in futures:
            try:
                ok.append(f.result())
            except grpc.RpcError as e:
                refused.append((e.code(), e.details(), time.monotonic()))
        assert blocker.result().predictions
        assert len(ok) == 2, (len(ok), refused)  # two waited, the rest were refused
        assert {c for c, _, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("queue full" in d and "--max-queue 2" in d for _, d, _ in refused)
        assert server.rt.batcher.stats["rejected"] == 4
        health = health_pb2_grpc.HealthStub(server.channel()).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Predict(text_request("stars", "fine"), timeout=10).predictions


def test_refusal_is_immediate(text_model_dir):
    hook = slow(0.5)
    with ServerThread(
        text_model_dir, "--max-batch", "1", "--max-queue", "1", model_hook=hook
    ) as server:
        stub = server.stub()
        batcher = server.rt.batcher
        busy = [stub.Predict.future(text_request("news", "a"), timeout=10)]
        assert hook.running.wait(10)  # one runs...
        wait_until(lambda: batcher.waiting == 0)
        busy.append(stub.Predict.future(text_request("news", "a"), timeout=10))
        wait_until(lambda: batcher.waiting == 1)  # ...one waits: the queue is full
        t0 = time.monotonic()
        try:
            stub.Predict(text_request("news", "b"), timeout=10)
            raise AssertionError("not refused")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 0.3  # not queued behind the 0.5 s batches
        for f in busy:
            assert f.result().predictions


def test_metrics_endpoint_counts_the_requests_sent(text_model_dir):
    with ServerThread(text_model_dir, "--metrics-port", "0", "--max-queue", "50") as server:
        port = server.rt.metrics_port
        before = scrape(port)
        assert before[("deepsurgery_model_version", ())] == 0
        stub = server.stub()
        for i in range(3):
            stub.Predict(text_request("news", f"stocks {i}"), timeout=10)
        for i in range(2):
            stub.Predict(text_request("*", f"the game {i}"), timeout=10)
        try:
            stub.Predict(text_request("no-such-task", "x"), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        m = scrape(port)
    req = "deepsurgery_requests_total"
    v1 = ("protocol", "deepsurgery.v1")
    assert m[(req, (("code", "OK"), v1, ("task", "news")))] == 3
    assert m[(req, (("code", "OK"), v1, ("task", "*")))] == 2
    assert m[(req, (("code", "NOT_FOUND"), v1, ("task", "unknown")))] == 1
    assert m[("deepsurgery_request_latency_seconds_count", (("task", "news"),))] == 3
    rows = m[("deepsurgery_inference_count_total", ())]
    runs = m[("deepsurgery_execution_count_total", ())]
    assert rows == 3 + 2 * 2  # a "*" request is one row per task
    assert 1 <= runs <= 5
    assert abs(m[("deepsurgery_average_batch_size", ())] - rows / runs) < 1e-9
    assert m[("deepsurgery_batch_rows_count", ())] == runs
    assert m[("deepsurgery_batch_rows_sum", ())] == rows
    assert m[("deepsurgery_queue_wait_seconds_count", ())] == 5
    assert m[("deepsurgery_queue_depth", ())] == 0
    assert m[("deepsurgery_queue_limit", ())] == 50
    assert m[("deepsurgery_in_flight_requests", ())] == 0
    info = [k for k in m if k[0] == "deepsurgery_model_info"]
    assert len(info) == 1 and ("tasks", "news,stars") in info[0][1]
    assert m[("process_resident_memory_bytes", ())] > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_exit_2(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_and_bad_flags_are_one_line_errors(text_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--model", str(text_model_dir), "--port", "0", "--metrics-port", str(port))
    one_line_exit_2(result, f"--metrics-port {port}: cannot listen")
    assert "address already in use" in result.stderr
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--max-queue", "-1"), "--max-queue")
    one_line_exit_2(
        run_cli("--model", str(text_model_dir), "--metrics-port", "70000"), "--metrics-port"
    )
