"""python -m runtime.client: ask a runtime.server for predictions, or list its tasks.

python -m runtime.client --addr 127.0.0.1:50051 --task agnews --text "Stocks rallied ..."
python -m runtime.client --addr 127.0.0.1:50051 --task '*' --image cat.jpg --top-k 3
python -m runtime.client --addr 127.0.0.1:50051 --list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.auth import read_token


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.client", description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--task", help="a task name, or '*' for every task")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--image", type=Path, help="an image file (PNG, JPEG, PPM, ...)")
    what.add_argument("--text", help="text to classify")
    what.add_argument("--list", action="store_true", help="print the server's tasks and exit")
    p.add_argument("--top-k", type=int, default=1, help="classes to show per task")
    p.add_argument("--token-file", type=Path, help="send 'authorization: Bearer <token>'")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): connect with TLS")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    return p


def make_channel(addr: str, tls_ca: Path | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(addr)
    creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
    return grpc.secure_channel(addr, creds)


def format_predictions(response: pb.PredictResponse) -> str:
    lines = []
    for p in response.predictions:
        lines.append(f"{p.task}: {p.label} ({p.score:.4f})")
        if len(p.top) > 1:
            lines.extend(f"    {t.label}: {t.score:.4f}" for t in p.top)
    return "\n".join(lines)


def format_tasks(response: pb.ListTasksResponse) -> str:
    lines = [f"modality: {response.modality}"]
    lines.extend(f"{t.name} ({len(t.classes)}): {', '.join(t.classes)}" for t in response.tasks)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.list:
            if args.task is None:
                raise ValueError("--task NAME (or '*') is required unless --list")
            if args.image is None and args.text is None:
                raise ValueError("give --image FILE or --text STR (or --list)")
            if args.image is not None and not args.image.is_file():
                what = "a directory" if args.image.is_dir() else "missing"
                raise ValueError(
                    f"--image '{args.image}' is {what}; give an image file (PNG, JPEG, PPM, ...)"
                )
        metadata = []
        if args.token_file:
            metadata.append(("authorization", f"Bearer {read_token(args.token_file)}"))
        request = None
        if not args.list:
            inp = (
                pb.Input(image=args.image.read_bytes()) if args.image else pb.Input(text=args.text)
            )
            request = pb.PredictRequest(task=args.task, input=inp, top_k=args.top_k)
        with make_channel(args.addr, args.tls_ca) as channel:
            stub = pb_grpc.InferenceStub(channel)
            if args.list:
                print(
                    format_tasks(
                        stub.ListTasks(
                            pb.ListTasksRequest(), timeout=args.timeout, metadata=metadata
                        )
                    )
                )
            else:
                print(
                    format_predictions(
                        stub.Predict(request, timeout=args.timeout, metadata=metadata)
                    )
                )
    except (ValueError, OSError) as e:
        print(f"runtime.client: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"runtime.client: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
