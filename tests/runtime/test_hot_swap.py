"""A directory of model versions: newest valid served, hot-swap under load, broken ones refused."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from runtime_testkit import ServerThread, make_text_model_dir, text_request
from test_server_process import launch

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.manifest import ModelDirError
from runtime.versions import VersionManager, candidates

NEW_TASKS = {
    "topic": ["World", "Sports", "Business"],
    "stars": ["1", "2", "3", "4", "5"],
    "tone": ["negative", "positive"],
}


def add_version(root: Path, number: int, tasks=None, seed: int = 0) -> Path:
    """Write a version the way export does: complete in a temp dir, then one rename."""
    tmp = root / f".tmp-{number}"
    make_text_model_dir(tmp, tasks=tasks, per_task=False, seed=seed)
    final = root / str(number)
    os.replace(tmp, final)
    return final


def add_broken_version(root: Path, number: int, like: Path) -> Path:
    tmp = root / f".tmp-{number}"
    shutil.copytree(like, tmp)
    with open(tmp / "model.onnx", "ab") as f:
        f.write(b"\0")  # sha256 no longer matches the manifest
    final = root / str(number)
    os.replace(tmp, final)
    return final


def task_names(stub) -> list[str]:
    return [t.name for t in stub.ListTasks(pb.ListTasksRequest(), timeout=10).tasks]


def test_newest_valid_version_is_served_and_broken_newer_ones_refused(tmp_path, caplog):
    add_version(tmp_path, 1)
    add_version(tmp_path, 2, NEW_TASKS, seed=1)
    add_broken_version(tmp_path, 10, tmp_path / "2")
    (tmp_path / "notes").mkdir()  # not a number: ignored
    assert [c.version for c in candidates(tmp_path)] == [10, 2, 1]
    with caplog.at_level(logging.ERROR, logger="runtime.versions"):
        with ServerThread(tmp_path) as server:
            assert server.rt.model.version == 2
            assert task_names(server.stub()) == list(NEW_TASKS)
    refusals = [r.getMessage() for r in caplog.records]
    assert len(refusals) == 1 and "model version 10 refused" in refusals[0]
    assert "sha256 mismatch" in refusals[0]


def test_no_valid_version_and_no_versions_are_clear_errors(tmp_path):
    with pytest.raises(ModelDirError, match="numbered versions"):
        candidates(tmp_path)
    (tmp_path / "1").mkdir()  # empty: no manifest
    with pytest.raises(ModelDirError, match="no version loads"):
        VersionManager(
            tmp_path, lambda p, v: (_ for _ in ()).throw(ModelDirError(str(p)))
        ).initial()


def test_swap_under_load_fails_no_request_and_list_tasks_follows(tmp_path):
    add_version(tmp_path, 1)
    with ServerThread(tmp_path, "--metrics-port", "0", "--max-delay-ms", "2") as server:
        stub = pb_grpc.InferenceStub(server.channel())
        stop = threading.Event()
        answered, failures, seen_tasks = [], [], set()

        def client(c: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = stub.Predict(text_request("*", f"the game {c} {i}", top_k=1), timeout=10)
                    answered.append(len(r.predictions))
                    seen_tasks.add(tuple(p.task for p in r.predictions))
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            add_version(tmp_path, 2, NEW_TASKS, seed=1)
            swapped = asyncio.run_coroutine_threadsafe(server.rt.reload(), server.loop).result(30)
            assert swapped and server.rt.model.version == 2
            assert task_names(stub) == list(NEW_TASKS)
            time.sleep(0.3)
            add_broken_version(tmp_path, 3, tmp_path / "2")
            kept = asyncio.run_coroutine_threadsafe(server.rt.reload(), server.loop).result(30)
            assert not kept and server.rt.model.version == 2  # refused; 2 keeps serving
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        from test_queue_metrics import scrape

        m = scrape(server.rt.metrics_port)
    assert not failures, failures[:5]
    assert len(answered) > 50
    assert seen_tasks == {("news", "stars"), tuple(NEW_TASKS)}  # both models answered
    assert m[("deepsurgery_model_version", ())] == 2
    assert m[("deepsurgery_model_reloads_total", (("result", "loaded"),))] == 1
    assert m[("deepsurgery_model_reloads_total", (("result", "refused"),))] == 1


def test_sighup_and_watch_in_a_real_process(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    add_version(models, 1)
    proc, addr = launch(models, tmp_path, "--watch", "--watch-interval-s", "0.2")
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(addr))
        assert task_names(stub) == ["news", "stars"]
        add_version(models, 2, NEW_TASKS, seed=1)  # --watch picks it up
        deadline = time.monotonic() + 20
        while task_names(stub) != list(NEW_TASKS):
            assert time.monotonic() < deadline, "--watch did not swap in version 2"
            time.sleep(0.1)
        # a broken version 3, then SIGHUP: refused, version 2 keeps serving
        add_broken_version(models, 3, models / "2")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert task_names(stub) == list(NEW_TASKS)
        assert stub.Predict(text_request("tone", "great food"), timeout=10).predictions
        # fixed under the same number: the watcher sees the files change and loads it
        shutil.rmtree(models / "3")
        add_version(models, 3, {"only": ["a", "b"]}, seed=2)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while task_names(stub) != ["only"]:
            assert time.monotonic() < deadline, "version 3 was not loaded once fixed"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    refusals = [line for line in err.splitlines() if "refused" in line]
    assert len(refusals) == 1 and "model version 3 refused" in refusals[0], err
    assert "SIGHUP" in err and "now serving version 2" in err and "now serving version 3" in err
    assert "Traceback" not in err


def test_plain_model_dir_reloads_only_when_its_files_change(tmp_path):
    from runtime.server import ServerOptions, load_model, make_versions

    model_dir = make_text_model_dir(tmp_path / "model", per_task=False)
    options = ServerOptions(model=model_dir)
    manager = make_versions(options)
    first = manager.initial()
    assert first.version is None and manager.reload() is None  # unchanged: nothing to do
    make_text_model_dir(model_dir, tasks=NEW_TASKS, per_task=False, seed=1)  # rewritten
    model, cand = manager.reload()
    assert cand.version is None and model.names == list(NEW_TASKS)
    assert load_model(options).names == list(NEW_TASKS)


def test_a_failing_parity_record_is_refused(tmp_path, caplog):
    import json

    from runtime.versions import check_parity_record

    check_parity_record({"parity": {}}, tmp_path)  # no record: the probe run decides
    check_parity_record({"parity": {"max_abs_logit_diff": 3e-6, "top1_agreement": 1.0}}, tmp_path)
    with pytest.raises(ModelDirError, match="fp32 bar"):
        check_parity_record(
            {"parity": {"max_abs_logit_diff": 0.5, "top1_agreement": 0.9}}, tmp_path
        )
    with pytest.raises(ModelDirError, match="fp16 bar"):
        check_parity_record(
            {"precision": "fp16", "parity": {"max_abs_logit_diff": 0.01, "top1_agreement": 0.9}},
            tmp_path,
        )
    add_version(tmp_path, 1)
    bad = add_version(tmp_path, 2, seed=1)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["parity"] = {"max_abs_logit_diff": float("nan"), "top1_agreement": 1.0}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.ERROR, logger="runtime.versions"):
        with ServerThread(tmp_path) as server:
            assert server.rt.model.version == 1
    assert "model version 2 refused" in caplog.text and "not a finite number" in caplog.text
