"""The Open Inference Protocol on runtime.server's port, tested from outside with tritonclient
(its own environment, tests/runtime/oip_client.py): live/ready, every task's metadata, labels and
probabilities equal to Predict's on the same inputs, 32 strings in one ModelInfer, one-line
errors after which the server keeps serving, the metrics; in-process: v1 and v2 rows share one
batch, ModelReady follows a hot-swap, and the core imports neither grpc nor protobuf."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys

import grpc
import numpy as np
import pytest
from runtime_testkit import (
    IMAGE_TASKS,
    REPO,
    TEXT_TASKS,
    WORDS,
    ServerThread,
    make_text_model_dir,
    png_bytes,
    run_oip_client,
    softmax,
    text_request,
)
from test_queue_metrics import scrape

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(32)]


def test_the_core_imports_neither_grpc_nor_protobuf():
    check = (
        "import sys, runtime.core, runtime.api\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'protos') "
        "or m.startswith('google.protobuf'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def case(model: str, name: str, rows: list, datatype="BYTES", encoding="text", **kw) -> dict:
    """One ModelInfer for oip_client.py."""
    return {"model": model, "input": name, "datatype": datatype, "encoding": encoding,
            "rows": rows, **kw}  # fmt: skip


def expect_error(result: dict, code: str, *needles: str) -> None:
    assert "error" in result, result
    assert result["error"]["code"] == code, result
    message = result["error"]["message"]
    assert "\n" not in message and all(n in message for n in needles), message


def test_tritonclient_talks_to_runtime_server(text_model_dir, tmp_path):
    bad_utf8 = base64.b64encode(b"caf\xe9 \xff").decode()
    spec = {
        "models": list(TEXT_TASKS),
        "infer": [
            case("news", "text", TEXTS),
            case("stars", "text", TEXTS[:3], outputs=["probabilities"], version="1"),
            case("nope", "text", ["x"]),
            case("news", "text", [1.0], datatype="FP32", encoding="fp32"),
            case("news", "pixels", ["a"]),
            case("news", "text", []),
            case("news", "text", ["the game", "market"], shape=[3]),
            case("news", "text", [bad_utf8], encoding="base64"),
            case("news", "text", ["x"], version="7"),
            case("news", "text", ["x"], outputs=["logits"]),
            case("stars", "text", ["great food"], outputs=["label"]),
        ],
    }
    with ServerThread(text_model_dir, "--metrics-port", "0") as server:
        report = run_oip_client(server.addr, spec, tmp_path)
        stub = server.stub()
        want = {
            (task, text): stub.Predict(text_request(task, text), timeout=10).predictions[0]
            for task, texts in [("news", TEXTS), ("stars", TEXTS[:3] + ["great food"])]
            for text in texts
        }
        metrics = scrape(server.rt.metrics_port)
        batcher = dict(server.rt.batcher.stats)
    assert report["live"] and report["ready"] and report["server"]["name"] == "deepsurgery"
    assert report["unknown_ready"] is False
    for task, classes in TEXT_TASKS.items():
        meta = report["models"][task]
        assert meta["ready"] and meta["metadata"]["name"] == task
        assert meta["metadata"]["versions"] == ["1"]
        assert meta["metadata"]["inputs"] == [
            {"name": "text", "datatype": "BYTES", "shape": ["-1"]}
        ]
        assert meta["metadata"]["outputs"] == [
            {"name": "label", "datatype": "BYTES", "shape": ["-1"]},
            {"name": "probabilities", "datatype": "FP32", "shape": ["-1", str(len(classes))]},
        ]
    results = report["results"]
    batch = results[0]["outputs"]  # 32 strings, one ModelInfer
    assert batch["label"]["shape"] == [32] and batch["probabilities"]["shape"] == [32, 4]
    assert batch["label"]["data"] == [want["news", t].label for t in TEXTS]
    probs = np.asarray(batch["probabilities"]["data"])
    expected = np.stack([softmax(want["news", t].logits) for t in TEXTS])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert list(results[1]["outputs"]) == ["probabilities"] and results[1]["model_version"] == "1"
    np.testing.assert_allclose(
        results[1]["outputs"]["probabilities"]["data"],
        [softmax(want["stars", t].logits) for t in TEXTS[:3]],
        atol=1e-6,
    )
    expect_error(results[2], "NOT_FOUND", "unknown model 'nope'", "news", "stars")
    expect_error(results[3], "INVALID_ARGUMENT", "datatype FP32", "takes BYTES")
    expect_error(results[4], "INVALID_ARGUMENT", "'pixels' is not an input", "'text' (BYTES [-1])")
    expect_error(results[5], "INVALID_ARGUMENT", "0 rows")
    expect_error(results[6], "INVALID_ARGUMENT", "the shape and the raw contents disagree")
    expect_error(results[7], "INVALID_ARGUMENT", "not valid UTF-8", "row 0")
    expect_error(results[8], "NOT_FOUND", "version '7' is not served", "version 1 is")
    expect_error(results[9], "INVALID_ARGUMENT", "unknown output 'logits'", "'probabilities'")
    last = results[10]["outputs"]  # after every bad request, the server still answers
    assert list(last) == ["label"] and last["label"]["data"] == [want["stars", "great food"].label]
    assert batcher["rows"] >= 32 + 3 + 1
    req = "deepsurgery_requests_total"
    oip = ("protocol", "open-inference")
    assert metrics[(req, (("code", "OK"), oip, ("task", "news")))] == 1
    assert metrics[(req, (("code", "OK"), oip, ("task", "stars")))] == 2
    assert metrics[(req, (("code", "NOT_FOUND"), oip, ("task", "unknown")))] == 1
    assert metrics[(req, (("code", "NOT_FOUND"), oip, ("task", "news")))] == 1  # version 7
    assert metrics[(req, (("code", "INVALID_ARGUMENT"), oip, ("task", "news")))] == 6


def test_image_models_take_encoded_files_and_pixel_values(image_model_dir, tmp_path):
    from runtime.manifest import load_model_dir
    from runtime.preprocess import make_preprocessor

    images = [png_bytes(seed=s, size=(40 + 3 * s, 30)) for s in range(3)]
    pre = make_preprocessor(load_model_dir(image_model_dir))
    pixels = [pre.image(images[0]).tolist()]
    files = [base64.b64encode(b).decode() for b in images]
    spec = {
        "models": list(IMAGE_TASKS),
        "infer": [
            case("digits", "image", files, encoding="base64"),
            case("shapes", "pixel_values", pixels, datatype="FP32", encoding="fp32"),
            case("shapes", "text", ["x"]),
            case("shapes", "pixel_values", [[[0.0] * 8] * 8] * 3, datatype="FP32",
                 encoding="fp32", shape=[1, 3, 8, 8]),
        ],
    }  # fmt: skip
    with ServerThread(image_model_dir) as server:
        report = run_oip_client(server.addr, spec, tmp_path)
        stub = server.stub()

        def predict(task, image):
            request = pb.PredictRequest(task=task, input=pb.Input(image=image))
            return stub.Predict(request, timeout=10).predictions[0]

        want_digits = [predict("digits", b) for b in images]
        want_shapes = predict("shapes", images[0])
    inputs = report["models"]["digits"]["metadata"]["inputs"]
    assert inputs == [
        {"name": "image", "datatype": "BYTES", "shape": ["-1"]},
        {"name": "pixel_values", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]},
    ]
    results = report["results"]
    assert results[0]["outputs"]["label"]["data"] == [p.label for p in want_digits]
    assert results[1]["outputs"]["label"]["data"] == [want_shapes.label]
    np.testing.assert_allclose(
        results[1]["outputs"]["probabilities"]["data"][0], softmax(want_shapes.logits), atol=1e-5
    )
    expect_error(
        results[2], "INVALID_ARGUMENT", "'text' is not an input", "'image'", "pixel_values"
    )
    expect_error(results[3], "INVALID_ARGUMENT", "shape [1, 3, 8, 8]", "[N, 3, 32, 32]")


def test_v1_and_v2_rows_share_one_batch(text_model_dir):
    from runtime.protocols.deepsurgery_v1 import DeepsurgeryV1
    from runtime.protocols.open_inference import OpenInference, encode_bytes
    from runtime.server import ServerOptions, build_core, load_model

    options = ServerOptions(model=text_model_dir, max_delay_ms=2000, providers="cpu")
    rows = TEXTS[:5]
    request = v2.ModelInferRequest(
        model_name="news",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[5])],
        raw_input_contents=[encode_bytes([t.encode() for t in rows])],
    )

    async def both():
        core = build_core(load_model(options), options)
        core.start()
        try:
            return await asyncio.gather(
                OpenInference(core).ModelInfer(request, None),
                DeepsurgeryV1(core).Predict(text_request("stars", "the game"), None),
            ), dict(core.batcher.stats)
        finally:
            await core.close()

    (infer, predict), stats = asyncio.run(both())
    assert infer.outputs[0].shape == [5] and predict.predictions[0].task == "stars"
    assert stats["batches"] == 1 and stats["rows"] == 6 and stats["jobs"] == 6


def test_model_ready_follows_a_hot_swap(tmp_path):
    new_tasks = {"topic": ["World", "Sports"], "tone": ["negative", "positive"]}
    make_text_model_dir(tmp_path / "1", per_task=False)
    with ServerThread(tmp_path) as server:
        stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
        ready = lambda name: stub.ModelReady(v2.ModelReadyRequest(name=name), timeout=10).ready  # noqa: E731
        assert ready("news") and not ready("topic")
        meta = stub.ModelMetadata(v2.ModelMetadataRequest(name="news"), timeout=10)
        assert list(meta.versions) == ["1"] and meta.platform == "onnxruntime_onnx"
        make_text_model_dir(tmp_path / "2", tasks=new_tasks, per_task=False, seed=1)
        assert asyncio.run_coroutine_threadsafe(server.rt.reload(), server.loop).result(30)
        assert ready("topic") and not ready("news")
        meta = stub.ModelMetadata(v2.ModelMetadataRequest(name="topic"), timeout=10)
        assert list(meta.versions) == ["2"] and meta.outputs[1].shape == [-1, 2]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(v2.ModelMetadataRequest(name="news"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        health = server.rt.services
        assert health == ["deepsurgery.v1.Inference", "inference.GRPCInferenceService"]


def test_protocols_flag_serves_only_those_and_refuses_unknown_names(text_model_dir):
    with ServerThread(text_model_dir, "--protocols", "open-inference") as server:
        with pytest.raises(grpc.RpcError) as err:
            server.stub().Predict(text_request("news", "x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
        assert stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live
    from runtime.server import ServerOptions

    with pytest.raises(ValueError, match="unknown 'kserve'; known: deepsurgery.v1,open-inference"):
        ServerOptions(model=text_model_dir, protocols=("kserve",)).check()


def test_bytes_tensors_round_trip_and_disagreeing_data_is_refused():
    from runtime.api import InvalidArgument
    from runtime.protocols.open_inference import decode_bytes, encode_bytes

    items = [b"", b"caf\xc3\xa9", b"x" * 300]
    raw = encode_bytes(items)
    assert decode_bytes(raw, 3, "input 'text'") == items
    for data, count, needle in [
        (raw, 4, "end after 3 of the 4 elements"),
        (raw, 2, "bytes follow the 2 elements"),
        (raw[:-1], 3, "element 2 claims 300 bytes but 299 remain"),
        (raw[:2], 1, "end after 0 of the 1 elements"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            decode_bytes(data, count, "input 'text'")
