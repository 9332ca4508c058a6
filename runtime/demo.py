"""python -m runtime.demo --model DIR (--text STR | --image FILE): the end of ``make run``.

Starts ``runtime.server`` on a free port as a separate process, waits until its health
service says SERVING, sends one real ``Predict`` per task and one ``*``, prints the answers,
then stops the server with SIGTERM and checks that it drained and exited cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.client import format_predictions, format_tasks


def _wait_serving(port_file: Path, server: subprocess.Popen, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before serving")
        text = port_file.read_text().strip() if port_file.is_file() else ""
        if text:
            addr = f"127.0.0.1:{text}"
            with grpc.insecure_channel(addr) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return addr
        time.sleep(0.2)
    raise RuntimeError(f"the server was not SERVING within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="model dir written by export.onnx")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="one text sent to every task")
    what.add_argument("--image", type=Path, help="one image file sent to every task")
    args = p.parse_args(argv)
    inp = pb.Input(image=args.image.read_bytes()) if args.image else pb.Input(text=args.text)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.server",
                "--model",
                str(args.model),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--providers",
                "auto",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            addr = _wait_serving(port_file, server)
            with grpc.insecure_channel(addr) as channel:
                stub = pb_grpc.InferenceStub(channel)
                tasks = stub.ListTasks(pb.ListTasksRequest(), timeout=10)
                print(format_tasks(tasks))
                print(f"input: {args.text!r}" if args.text else f"input: {args.image}")
                for name in [t.name for t in tasks.tasks] + ["*"]:
                    reply = stub.Predict(
                        pb.PredictRequest(task=name, input=inp, top_k=1), timeout=30
                    )
                    print(
                        f"Predict(task={name!r}) ->\n  "
                        + format_predictions(reply).replace("\n", "\n  ")
                    )
        except (RuntimeError, grpc.RpcError) as exc:
            print(f"runtime.demo: error: {exc}", file=sys.stderr)
            server.kill()
            return 1
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"server drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
