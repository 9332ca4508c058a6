"""Regenerate the Python stubs of the served APIs: deepsurgery.v1 and the Open Inference
Protocol (protos/inference/grpc_predict_v2.proto, package `inference`).

    python -m protos.generate            # rewrite protos/**/*_pb2*.py
    python -m protos.generate --out DIR  # write them under DIR/ instead

protoc writes `from deepsurgery.v1 import inference_pb2` (and `from inference import ...`) into
the grpc stubs, which only works with protos/ on sys.path; `fix_imports` makes them relative
imports so the stubs import as `protos.deepsurgery.v1` and `protos.inference`.
The grpc plugin also stamps its own version into each `*_pb2_grpc.py` as the oldest grpcio the
stub will run on; `stamp_grpc_floor` replaces it with the grpcio floor that pyproject.toml
declares, so any grpcio-tools patch release writes the same files and the stubs ask for exactly
the grpcio the package requires.
tests/runtime/test_protos.py runs the same steps and compares.
Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PYPROJECT = PROTO_ROOT.parent / "pyproject.toml"
PROTO_FILES = ["deepsurgery/v1/inference.proto", "inference/grpc_predict_v2.proto"]
GENERATED = [
    "deepsurgery/v1/inference_pb2.py",
    "deepsurgery/v1/inference_pb2_grpc.py",
    "inference/grpc_predict_v2_pb2.py",
    "inference/grpc_predict_v2_pb2_grpc.py",
]


def fix_imports(source: str) -> str:
    """`from deepsurgery.v1 import x_pb2` -> `from . import x_pb2` (each proto's stubs live in
    one package, named like the proto's folder)."""
    return re.sub(
        r"^from (?:deepsurgery\.v1|inference) import ", "from . import ", source, flags=re.M
    )


def grpc_floor(pyproject: Path = PYPROJECT) -> str:
    """The X.Y.Z of pyproject.toml's `grpcio>=X.Y.Z` requirement (core or any extra)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    for dep in [*project.get("dependencies", []), *(d for group in extras for d in group)]:
        match = re.fullmatch(r"grpcio\s*>=\s*([0-9][0-9.]*)(?:\s*,.*)?", dep.strip())
        if match:
            return match.group(1)
    raise RuntimeError(f"{pyproject} requires no `grpcio>=X.Y.Z` to stamp the stubs with")


def stamp_grpc_floor(source: str, floor: str) -> str:
    """`GRPC_GENERATED_VERSION = '<grpcio-tools version>'` -> the project's grpcio floor."""
    stamped, n = re.subn(
        r"^GRPC_GENERATED_VERSION = '[^']*'$",
        f"GRPC_GENERATED_VERSION = '{floor}'",
        source,
        flags=re.M,
    )
    if n != 1:
        raise RuntimeError("the grpc stub has no single GRPC_GENERATED_VERSION line to stamp")
    return stamped


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTO_FILES into out_dir; return the written stub paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_ROOT / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}")
    floor = grpc_floor()
    written = []
    for rel in GENERATED:
        path = out_dir / rel
        source = fix_imports(path.read_text())
        if rel.endswith("_pb2_grpc.py"):
            source = stamp_grpc_floor(source, floor)
        path.write_text(source)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
