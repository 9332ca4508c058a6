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
