"""The server as a real process: no torch, CLI errors, SIGTERM drains then exits 0."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_testkit import REPO, text_request, wait_until

from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

FORBIDDEN = ("torch", "open_clip", "transformers", "trainer", "torchvision")

# Run the server with the forbidden modules blocked; run_batch is slowed so that the SIGTERM
# test can catch requests in flight.
LAUNCHER = f"""
import os, sys, time
for name in {FORBIDDEN!r}:
    sys.modules[name] = None
from runtime import core, server
delay = float(sys.argv[1])
inner = core.InferenceModel.run_batch
def run_batch(self, works):
    time.sleep(delay)
    return inner(self, works)
core.InferenceModel.run_batch = run_batch
arrivals = os.environ.get("DEEPSURGERY_TEST_ARRIVALS")
if arrivals:  # one line per request queued, so a test knows when all of its requests arrived
    from runtime import batcher
    inner_submit = batcher.Batcher.submit
    def submit(self, *args, **kwargs):
        with open(arrivals, "a") as f:
            f.write("queued\\n")
        return inner_submit(self, *args, **kwargs)
    batcher.Batcher.submit = submit
import runtime.client  # the client must import without torch too
code = server.main(sys.argv[2:])
leaked = [m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r} and sys.modules[m] is not None]
assert not leaked, leaked
sys.exit(code)
"""


def launch(model_dir: Path, tmp_path: Path, *flags: str, delay: float = 0.0, env=None):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            str(delay),
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def test_sigterm_drains_in_flight_requests_then_exits_0(text_model_dir, tmp_path):
    arrivals = tmp_path / "arrivals"
    proc, addr = launch(
        text_model_dir,
        tmp_path,
        "--max-batch",
        "2",
        delay=0.25,
        env={"DEEPSURGERY_TEST_ARRIVALS": str(arrivals)},
    )
    try:
        channel = grpc.insecure_channel(addr)
        stub = pb_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1  # SERVING
        futures = [
            stub.Predict.future(text_request("*", f"game {i}"), timeout=20) for i in range(6)
        ]
        wait_until(  # all six queued (three batches of 2 x 0.25 s)
            lambda: arrivals.exists() and len(arrivals.read_text().splitlines()) == 6,
            timeout=20,
            what="the six requests to reach the server",
        )
        proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
        assert all(len(r.predictions) == 2 for r in results)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "providers: ['CPUExecutionProvider']" in err  # the provider choice is logged
    assert "draining" in err


def test_runtime_sources_never_import_torch():
    """runtime/ and the modeldir contract it reads model dirs with."""
    sources = [*(REPO / "runtime").rglob("*.py"), *(REPO / "modeldir").rglob("*.py")]
    assert any(p.parent.name == "modeldir" for p in sources)
    for path in sorted(sources):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path} imports {name}"


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


def test_cli_errors_are_one_line_exit_2(text_model_dir, tmp_path):
    one_line_exit_2(run_cli("--model", str(tmp_path / "missing")), "not a directory")
    one_line_exit_2(run_cli("--model", str(tmp_path)), "manifest.json")
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--max-batch", "zero"), "--max-batch")
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--providers", "tpu"), "--providers")
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--max-batch", "0"), "--max-batch")
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--tls-cert", "x"), "--tls-key")
    one_line_exit_2(run_cli("--model", str(text_model_dir), "--task", "nope"), "nope")


def test_sha256_mismatch_refuses_to_start(text_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(text_model_dir, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    one_line_exit_2(run_cli("--model", str(bad)), "sha256 mismatch")
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["sha256"]["model.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    one_line_exit_2(run_cli("--model", str(bad)), "no sha256")


def test_client_cli_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime.client", "--task", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2 and "--image" in result.stderr
