"""Real in-process gRPC round trips, one per input kind, checked against a direct session.run."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from runtime_testkit import IMAGE_TASKS, TEXT_TASKS, ServerThread, png_bytes, text_request

from protos.deepsurgery.v1 import inference_pb2 as pb
from runtime.manifest import load_model_dir
from runtime.preprocess import make_preprocessor


def direct_logits(model_dir, row: np.ndarray, task_index: int) -> np.ndarray:
    """The same row through a plain onnxruntime session (what the server must reproduce)."""
    spec = load_model_dir(model_dir)
    feeds = make_preprocessor(spec).collate([row])
    feeds["task_ids"] = np.array([task_index], np.int64)
    if spec.shares_inputs:
        feeds["input_index"] = np.array([0], np.int64)
    sess = ort.InferenceSession(str(spec.graph), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0][0]


def check_prediction(p: pb.Prediction, classes: list[str], logits: np.ndarray, top_k: int):
    n = len(classes)
    np.testing.assert_allclose(p.logits, logits[:n], rtol=1e-5, atol=1e-5)
    probs = np.exp(logits[:n] - logits[:n].max())
    probs /= probs.sum()
    assert p.label == classes[int(np.argmax(probs))]
    assert p.score == pytest.approx(probs.max(), rel=1e-5)
    assert len(p.top) == min(top_k or 1, n)
    assert p.top[0].label == p.label
    assert [t.score for t in p.top] == sorted((t.score for t in p.top), reverse=True)


def test_text_round_trip_every_task(text_server, text_model_dir):
    text = "Stocks rallied as the market won"
    resp = text_server.stub().Predict(text_request("*", text, top_k=3), timeout=10)
    pre = make_preprocessor(load_model_dir(text_model_dir))
    row = pre.text(text)
    assert [p.task for p in resp.predictions] == list(TEXT_TASKS)
    for t, (p, classes) in enumerate(zip(resp.predictions, TEXT_TASKS.values(), strict=True)):
        check_prediction(p, classes, direct_logits(text_model_dir, row, t), 3)


def test_image_round_trip_one_task(image_server, image_model_dir):
    data = png_bytes((45, 37), seed=3, fmt="JPEG")
    req = pb.PredictRequest(task="shapes", input=pb.Input(image=data))
    (p,) = image_server.stub().Predict(req, timeout=10).predictions
    row = make_preprocessor(load_model_dir(image_model_dir)).image(data)
    check_prediction(p, IMAGE_TASKS["shapes"], direct_logits(image_model_dir, row, 1), 1)
    assert len(p.logits) == 3  # no padding columns


def test_tensor_round_trip_image_and_text(
    image_server, image_model_dir, text_server, text_model_dir
):
    row = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    tensor = pb.Tensor(dtype="float32", shape=[3, 32, 32], data=row.tobytes())
    req = pb.PredictRequest(task="digits", input=pb.Input(tensor=tensor), top_k=10)
    (p,) = image_server.stub().Predict(req, timeout=10).predictions
    check_prediction(p, IMAGE_TASKS["digits"], direct_logits(image_model_dir, row, 0), 10)

    ids = make_preprocessor(load_model_dir(text_model_dir)).text("stocks rallied")
    tensor = pb.Tensor(dtype="int64", shape=[4], data=ids.tobytes())
    by_tensor = text_server.stub().Predict(
        pb.PredictRequest(task="news", input=pb.Input(tensor=tensor)), timeout=10
    )
    by_text = text_server.stub().Predict(text_request("news", "stocks rallied"), timeout=10)
    assert list(by_tensor.predictions[0].logits) == list(by_text.predictions[0].logits)


def test_list_tasks_health_and_reflection(text_server):
    resp = text_server.stub().ListTasks(pb.ListTasksRequest(), timeout=10)
    assert resp.modality == "text"
    assert {t.name: list(t.classes) for t in resp.tasks} == TEXT_TASKS
    channel = text_server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "deepsurgery.v1.Inference"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"deepsurgery.v1.Inference", "grpc.health.v1.Health"} <= names


def test_top_k_zero_means_one(text_server):
    (p,) = text_server.stub().Predict(text_request("stars", "great food"), timeout=10).predictions
    assert len(p.top) == 1 and len(p.logits) == 5


def test_star_top_k_is_capped_per_task(text_server):
    resp = text_server.stub().Predict(text_request("*", "great food", top_k=5), timeout=10)
    assert [len(p.top) for p in resp.predictions] == [4, 5]


def test_per_task_graph_serves_the_same_answers(text_model_dir):
    req = text_request("stars", "terrible movie", top_k=2)
    with (
        ServerThread(text_model_dir) as fused,
        ServerThread(text_model_dir, "--task", "stars") as one,
    ):
        a = fused.stub().Predict(req, timeout=10).predictions[0]
        b = one.stub().Predict(req, timeout=10).predictions[0]
        star = one.stub().Predict(text_request("*", "terrible movie"), timeout=10)
        tasks = one.stub().ListTasks(pb.ListTasksRequest(), timeout=10)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    assert a.label == b.label
    assert [p.task for p in star.predictions] == ["stars"]
    assert [t.name for t in tasks.tasks] == ["stars"]
