"""Every error class over real gRPC, and bad requests batched with good ones."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_testkit import ServerThread, png_bytes, text_request, wait_until

from protos.deepsurgery.v1 import inference_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def rpc_error(stub, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=kw.pop("timeout", 10), **kw)
    return info.value


def tensor(dtype: str, shape, arr: np.ndarray) -> pb.Input:
    return pb.Input(tensor=pb.Tensor(dtype=dtype, shape=shape, data=arr.tobytes()))


def test_unknown_task_is_not_found_and_lists_tasks(text_server):
    err = rpc_error(text_server.stub(), text_request("sports", "hello"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'sports'" in err.details() and "news" in err.details() and "stars" in err.details()
    err = rpc_error(text_server.stub(), text_request("", "hello"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "request_,needle",
    [
        (text_request("news", ""), "empty"),
        (text_request("news", "  \n\t "), "whitespace"),
        (pb.PredictRequest(task="news", input=pb.Input(image=png_bytes())), "classifies text"),
        (pb.PredictRequest(task="news"), "input is empty"),
        (pb.PredictRequest(task="news", input=tensor("float32", [3], np.zeros(3))), "dtype"),
        (pb.PredictRequest(task="news", input=tensor("int64", [2, 2], np.zeros(4, int))), "shape"),
        (pb.PredictRequest(task="news", input=tensor("int64", [1], np.array([99999]))), "vocab"),
        (text_request("news", "hi", top_k=-1), "top_k -1"),
        (text_request("news", "hi", top_k=5), "top_k 5"),
        (text_request("*", "hi", top_k=6), "top_k 6"),
    ],
)
def test_text_invalid_arguments(text_server, request_, needle):
    err = rpc_error(text_server.stub(), request_)
    assert err.code() == INVALID, err.details()
    assert needle in err.details()


@pytest.mark.parametrize(
    "input_,needle",
    [
        (pb.Input(image=b"GIF89a-broken"), "could not be decoded"),
        (pb.Input(image=png_bytes()[:50]), "could not be decoded"),
        (pb.Input(image=b""), "empty"),
        (pb.Input(text="a cat"), "classifies images"),
        (tensor("float32", [3, 16, 16], np.zeros((3, 16, 16), np.float32)), "shape"),
        (tensor("int64", [3, 32, 32], np.zeros((3, 32, 32), np.int64)), "dtype"),
        (tensor("float32", [3, 32, 32], np.full((3, 32, 32), np.nan, np.float32)), "NaN"),
        (tensor("float32", [3, 32, 32], np.full((3, 32, 32), -np.inf, np.float32)), "Inf"),
    ],
)
def test_image_invalid_arguments(image_server, input_, needle):
    err = rpc_error(image_server.stub(), pb.PredictRequest(task="digits", input=input_))
    assert err.code() == INVALID, err.details()
    assert needle in err.details()


def test_oversized_message_is_resource_exhausted(image_model_dir):
    with ServerThread(image_model_dir, "--max-message-mb", "0.05") as server:
        big = pb.PredictRequest(task="digits", input=pb.Input(image=b"\0" * 100_000))
        err = rpc_error(server.stub(), big)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = server.stub().Predict(
            pb.PredictRequest(task="digits", input=pb.Input(image=png_bytes()))
        )
        assert len(ok.predictions) == 1


def slow_model(delay: float, calls: list):
    """Wrap run_batch to take `delay` seconds and record each batch's (task, top_k) rows."""

    def hook(model):
        inner = model.run_batch

        def run_batch(works):
            calls.append([(tuple(w.task_indices), w.top_k) for w in works])
            time.sleep(delay)
            return inner(works)

        model.run_batch = run_batch

    return hook


def test_expired_deadline_is_dropped_before_inference(text_model_dir):
    calls = []
    hook = slow_model(0.3, calls)
    with ServerThread(text_model_dir, "--max-batch", "1", model_hook=hook) as server:
        stub = server.stub()
        blocker = stub.Predict.future(text_request("news", "the game", top_k=1), timeout=10)
        wait_until(lambda: calls)  # the engine is now busy with `blocker` for ~300 ms
        err = rpc_error(stub, text_request("news", "the market", top_k=3), timeout=0.1)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(blocker.result().predictions) == 1
        time.sleep(0.4)  # the late request's turn has come and gone
        after = stub.Predict(text_request("stars", "fine", top_k=2), timeout=10)
        assert len(after.predictions) == 1
    assert [((0,), 3)] not in calls  # never reached session.run
    assert calls == [[((0,), 1)], [((1,), 2)]]


def test_many_clients_mixed_tasks_one_bad_request_in_the_batch(text_model_dir):
    calls = []
    hook = slow_model(0.05, calls)
    texts = ["stocks rallied", "the team won the game", "terrible food", "great movie", "science"]
    with ServerThread(
        text_model_dir, "--max-batch", "64", "--max-delay-ms", "50", model_hook=hook
    ) as server:
        stub = server.stub()
        # Occupy the engine so that the following requests pile up into one batch.
        blocker = stub.Predict.future(text_request("news", "the"), timeout=10)
        time.sleep(0.01)
        requests = []
        for i in range(40):
            task = ["news", "stars", "*"][i % 3]
            requests.append(text_request(task, texts[i % len(texts)] + f" {i}", top_k=1 + i % 3))
        bad_tensor = tensor("int64", [2], np.array([1, 10**9]))  # passes shape, fails vocab check
        requests[17] = text_request("nope", "x")
        requests[23] = text_request("news", "   ")
        requests[31] = pb.PredictRequest(task="stars", input=bad_tensor)
        futures = [stub.Predict.future(r, timeout=10) for r in requests]
        blocker.result()
        results = {}
        for i, f in enumerate(futures):
            try:
                results[i] = f.result()
            except grpc.RpcError as e:
                results[i] = e.code()
        expected_bad = {17: grpc.StatusCode.NOT_FOUND, 23: INVALID, 31: INVALID}
        for i, r in results.items():
            if i in expected_bad:
                assert r == expected_bad[i], i
                continue
            want = ["news", "stars"] if requests[i].task == "*" else [requests[i].task]
            assert [p.task for p in r.predictions] == want, i
        # The good ones were batched together: far fewer graph runs than requests.
        assert len(calls) <= 4, [len(c) for c in calls]
        health = health_pb2_grpc.HealthStub(server.channel()).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_answers_match_unbatched_answers_under_concurrency(text_model_dir):
    """Padding to the batch's longest row must not change any row's logits."""
    texts = ["a", "the team won the game a great game", "stocks fell", "food"] * 6
    tasks = ["news", "stars", "*"]
    with ServerThread(text_model_dir, "--max-delay-ms", "30") as server:
        stub = server.stub()
        alone = [
            stub.Predict(text_request(tasks[i % 3], t), timeout=10) for i, t in enumerate(texts)
        ]
        results = [None] * len(texts)

        def call(i):
            results[i] = stub.Predict(text_request(tasks[i % 3], texts[i]), timeout=10)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = server.rt.batcher.stats["batches"]
    for a, b in zip(alone, results, strict=True):
        for pa, pb_ in zip(a.predictions, b.predictions, strict=True):
            np.testing.assert_allclose(pa.logits, pb_.logits, rtol=1e-5, atol=1e-6)
    assert batches < 2 * len(texts)


def test_draining_reports_not_serving_and_finishes_in_flight(text_model_dir):
    import asyncio

    calls = []
    with ServerThread(text_model_dir, model_hook=slow_model(0.5, calls)) as server:
        stub = server.stub()
        in_flight = stub.Predict.future(text_request("*", "the game"), timeout=10)
        wait_until(lambda: calls)  # the batch is running
        stopping = asyncio.run_coroutine_threadsafe(server.rt.stop(10), server.loop)
        time.sleep(0.1)
        health = health_pb2_grpc.HealthStub(server.channel())
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        err = rpc_error(stub, text_request("news", "late"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
        assert len(in_flight.result().predictions) == 2
        stopping.result(10)
        server.rt = None
