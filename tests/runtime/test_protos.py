"""The checked-in stubs are exactly what protoc makes of inference.proto today."""

from __future__ import annotations

import pytest

from protos import generate
from protos.deepsurgery.v1 import inference_pb2 as pb


def test_stubs_match_regenerated(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")
    for fresh in generate.generate(tmp_path):
        rel = fresh.relative_to(tmp_path)
        checked_in = generate.PROTO_ROOT / rel
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in} is stale: run `python -m protos.generate` and commit the result"
        )


def test_api_shape_follows_design():
    assert pb.DESCRIPTOR.package == "deepsurgery.v1"
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert set(service.methods_by_name) == {"Predict", "ListTasks"}
    kind = pb.Input.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.name: f.number for f in kind.fields} == {"image": 1, "text": 2, "tensor": 3}
    assert set(pb.PredictRequest.DESCRIPTOR.fields_by_name) == {"task", "input", "top_k"}
    fields = set(pb.Prediction.DESCRIPTOR.fields_by_name)
    assert fields == {"task", "label", "score", "top", "logits"}


def fields_of(descriptor) -> dict:
    """message name -> {field: (number, type, repeated)}, nested messages included (runs in
    the client's protobuf 6 too, whose fields still have `label`; 7 has `is_repeated`)."""
    out = {}

    def walk(d, prefix=""):
        out[prefix + d.name] = {
            f.name: (f.number, f.type, f.label == 3 if hasattr(f, "label") else f.is_repeated)
            for f in d.fields
        }
        for nested in d.nested_types:
            walk(nested, prefix + d.name + ".")

    for d in descriptor.message_types_by_name.values():
        walk(d)
    return out


def test_open_inference_proto_is_wire_compatible_with_tritonclient():
    """Every message and field we serve has the number, type and cardinality that tritonclient's
    own generated service (Triton's superset of the KServe v2 proto) sends and reads."""
    import json
    import subprocess

    from runtime_testkit import client_python

    from protos.inference import grpc_predict_v2_pb2 as v2

    dump = (
        "import json, inspect\n"
        "from tritonclient.grpc import service_pb2 as s\n"
        + inspect_source()
        + "print(json.dumps(fields_of(s.DESCRIPTOR)))\n"
    )
    done = subprocess.run(
        [str(client_python()), "-c", dump], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    theirs = {m: {f: tuple(v) for f, v in fs.items()} for m, fs in json.loads(done.stdout).items()}
    ours = fields_of(v2.DESCRIPTOR)
    for message, fields in ours.items():
        assert message in theirs, message
        for name, spec in fields.items():
            assert theirs[message].get(name) == spec, (message, name, spec, theirs[message])
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(service.methods_by_name) == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
    }  # fmt: skip


def inspect_source() -> str:
    import inspect

    return inspect.getsource(fields_of)


def test_stubs_ask_for_the_grpcio_the_package_requires():
    floor = generate.grpc_floor()
    assert floor == "1.85.1"
    for rel in generate.GENERATED:
        if rel.endswith("_pb2_grpc.py"):
            text = (generate.PROTO_ROOT / rel).read_text()
            assert f"GRPC_GENERATED_VERSION = '{floor}'" in text
    # whatever grpcio-tools patch release wrote the stub, it is stamped with the floor
    tool_written = "import grpc\nGRPC_GENERATED_VERSION = '1.85.4'\nGRPC_VERSION = '1.85.4'\n"
    stamped = generate.stamp_grpc_floor(tool_written, floor)
    assert stamped == tool_written.replace("VERSION = '1.85.4'", f"VERSION = '{floor}'", 1)
    with pytest.raises(RuntimeError, match="GRPC_GENERATED_VERSION"):
        generate.stamp_grpc_floor("import grpc\n", floor)
