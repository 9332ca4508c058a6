"""Distinct inputs per batch: a `*` request is one input and T rows, identical inputs from
different requests in one batch window share their pass, model dirs from before
`input_index` still serve, `--group-by-task` keeps one task per batch, and the metrics count
distinct inputs per execution."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from runtime_testkit import (
    IMAGE_TASKS,
    TEXT_TASKS,
    ServerThread,
    make_image_model_dir,
    make_text_model_dir,
    png_bytes,
    text_request,
)
from test_queue_metrics import scrape

from protos.deepsurgery.v1 import inference_pb2 as pb
from runtime.core import Work, count_inputs, input_key
from runtime.manifest import load_model_dir


@pytest.fixture(scope="module")
def old_text_dir(tmp_path_factory):
    """The same tiny text model (same seed, same weights) exported before `input_index`."""
    return make_text_model_dir(tmp_path_factory.mktemp("old_text"), shared=False)


@pytest.fixture(scope="module")
def old_image_dir(tmp_path_factory):
    return make_image_model_dir(tmp_path_factory.mktemp("old_image"), shared=False)


class FeedSpy:
    """Records the feeds of every graph execution of a served model (a model_hook)."""

    def __init__(self, delay: float = 0.0):
        self.feeds: list[dict[str, np.ndarray]] = []
        self.delay = delay
        self.running = threading.Event()

    def __call__(self, model) -> None:
        inner = model.engine.run_feeds

        def run_feeds(feeds):
            self.feeds.append({k: v.copy() for k, v in feeds.items()})
            self.running.set()
            time.sleep(self.delay)
            return inner(feeds)

        model.engine.run_feeds = run_feeds


def assert_same_logits(got: pb.PredictResponse, want: pb.PredictResponse) -> None:
    assert [p.task for p in got.predictions] == [p.task for p in want.predictions]
    for a, b in zip(got.predictions, want.predictions, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-6)


def test_manifest_says_which_graphs_share_inputs(text_model_dir, old_text_dir):
    new, old = load_model_dir(text_model_dir), load_model_dir(old_text_dir)
    assert new.shares_inputs and new.input_names[-2:] == ("input_index", "task_ids")
    assert not old.shares_inputs and "input_index" not in old.input_names
    assert not load_model_dir(text_model_dir, task="news").shares_inputs


@pytest.mark.parametrize("old", [False, True])
def test_star_is_one_input_and_t_rows(old, text_model_dir, old_text_dir):
    spy = FeedSpy()
    with ServerThread(old_text_dir if old else text_model_dir, model_hook=spy) as server:
        resp = server.stub().Predict(text_request("*", "stocks rallied", top_k=2), timeout=10)
        assert [p.task for p in resp.predictions] == list(TEXT_TASKS)
        (feed,) = spy.feeds
        tasks = len(TEXT_TASKS)
        assert list(feed["task_ids"]) == list(range(tasks))
        if old:  # a graph without input_index gets the input once per row, as before
            assert "input_index" not in feed and feed["input_ids"].shape[0] == tasks
        else:
            assert feed["input_ids"].shape[0] == 1 and list(feed["input_index"]) == [0] * tasks
        assert server.rt.batcher.stats["inputs"] == 1 and server.rt.batcher.stats["rows"] == tasks


def test_old_and_new_model_dirs_answer_the_same(text_model_dir, old_text_dir):
    answers = []
    for model_dir in (text_model_dir, old_text_dir):
        with ServerThread(model_dir) as server:
            stub = server.stub()
            answers.append(
                [
                    stub.Predict(text_request(task, text), timeout=10)
                    for text in ("the game", "market fell", "great food")
                    for task in ("*", "stars")
                ]
            )
    for new, old in zip(*answers, strict=True):
        assert_same_logits(new, old)


def _concurrent(server, requests: list[pb.PredictRequest], spy: FeedSpy):
    """Send one blocker, then ``requests`` at once while it runs: they share one batch."""
    stub = server.stub()
    blocker = stub.Predict.future(text_request("news", "blocker"), timeout=20)
    assert spy.running.wait(10)
    futures = [stub.Predict.future(r, timeout=20) for r in requests]
    time.sleep(0.3)  # every request preprocessed and queued while the engine is busy
    assert blocker.result().predictions
    return [f.result() for f in futures]


def test_identical_texts_in_one_batch_share_their_pass(text_model_dir):
    spy = FeedSpy(delay=0.5)
    with ServerThread(text_model_dir, "--max-delay-ms", "200", model_hook=spy) as server:
        requests = [
            text_request("news", "the market fell"),
            text_request("stars", "the market fell"),
            text_request("*", "the market fell"),
            text_request("news", "great food"),
            text_request("news", "the market fell"),  # the same request twice
        ]
        answers = _concurrent(server, requests, spy)
        batch = spy.feeds[-1]
        assert batch["input_ids"].shape[0] == 2  # two distinct texts
        assert len(batch["task_ids"]) == 1 + 1 + len(TEXT_TASKS) + 1 + 1
        texts = [batch["input_ids"][i] for i in batch["input_index"]]
        assert sum((t == texts[0]).all() for t in texts) == len(texts) - 1
    alone = {}
    with ServerThread(text_model_dir) as server:
        for r in requests:
            key = (r.task, r.input.text)
            alone[key] = server.stub().Predict(r, timeout=10)
    for r, got in zip(requests, answers, strict=True):
        want = alone[(r.task, r.input.text)]
        assert_same_logits(got, want)


def test_identical_images_and_tensors_share(image_model_dir):
    spy = FeedSpy(delay=0.5)
    image = png_bytes((40, 30), seed=1)
    row = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    tensor = pb.Tensor(dtype="float32", shape=[3, 32, 32], data=row.tobytes())
    with ServerThread(image_model_dir, "--max-delay-ms", "200", model_hook=spy) as server:
        stub = server.stub()
        blocker = stub.Predict.future(
            pb.PredictRequest(task="digits", input=pb.Input(image=png_bytes(seed=9))), timeout=20
        )
        assert spy.running.wait(10)
        futures = [
            stub.Predict.future(pb.PredictRequest(task=task, input=inp), timeout=20)
            for task in ("digits", "shapes", "*")
            for inp in (pb.Input(image=image), pb.Input(tensor=tensor))
        ]
        time.sleep(0.3)
        blocker.result()
        for f in futures:
            assert f.result().predictions
        batch = spy.feeds[-1]
        assert batch["pixel_values"].shape[0] == 2
        assert len(batch["task_ids"]) == 2 * (1 + 1 + len(IMAGE_TASKS))


def test_group_by_task_runs_one_task_per_batch(text_model_dir):
    spy = FeedSpy(delay=0.3)
    with ServerThread(
        text_model_dir, "--group-by-task", "--max-delay-ms", "100", model_hook=spy
    ) as server:
        requests = [text_request("*", "the game"), text_request("news", "great food")]
        answers = _concurrent(server, requests, spy)
        assert [p.task for p in answers[0].predictions] == list(TEXT_TASKS)
        for feed in spy.feeds:
            assert len(set(feed["task_ids"].tolist())) == 1
        assert len(spy.feeds) == 1 + len(TEXT_TASKS)  # blocker, then one batch per task
    with ServerThread(text_model_dir) as server:
        want = server.stub().Predict(requests[0], timeout=10)
    assert_same_logits(answers[0], want)


def test_metrics_count_distinct_inputs(text_model_dir):
    with ServerThread(text_model_dir, "--metrics-port", "0") as server:
        stub = server.stub()
        stub.Predict(text_request("*", "the game"), timeout=10)
        stub.Predict(text_request("news", "the game"), timeout=10)
        metrics = scrape(server.rt.metrics_port)
    tasks = len(TEXT_TASKS)
    assert metrics[("deepsurgery_input_count_total", ())] == 2
    assert metrics[("deepsurgery_inference_count_total", ())] == tasks + 1
    assert metrics[("deepsurgery_batch_inputs_count", ())] == 2
    assert metrics[("deepsurgery_average_inputs_per_execution", ())] == 1.0
    assert metrics[("deepsurgery_average_batch_size", ())] == (tasks + 1) / 2


def test_input_key_and_count_inputs():
    a = np.arange(6, dtype=np.int64)
    assert input_key(a) == input_key(a.copy())
    assert input_key(a) != input_key(a.reshape(2, 3))  # same bytes, another shape
    assert input_key(a) != input_key(a.astype(np.float64).view(np.int64))
    works = [
        Work(a, [0], 1, None, input_key(a)),
        Work(a.copy(), [1, 2], 1, None, input_key(a)),
        Work(a, [0], 1),  # no key: never shared
    ]
    assert count_inputs(works) == 2
