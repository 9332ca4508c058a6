"""The whole chain a user runs: trainer.fit (demo, real MiniLM) -> export.onnx -> gRPC server.

Slow (a couple of minutes on 2 cores) but run by `make test`: the demo config, shortened with
--set (two merge methods, fewer steps and rows), is trained, exported with per-task graphs, and
served for one Predict per task and '*'. The searches, the other merges and the protocols have
their own tests on tiny models.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args, timeout=900):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_fit_export_serve(tmp_path):
    out = tmp_path / "demo"
    stdout = _run(
        "-m",
        "trainer.fit",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--set",
        "finetune.steps=30",
        "--set",
        "surgery.iterations=10",
        "--set",
        "merge.adamerging.iterations=3",
        "--set",
        'merge.methods=["task_arithmetic", "adamerging"]',
        "--set",
        "demo.test=120",
        "--set",
        "validation.size=60",
    )
    assert "task_arithmetic w/ SurgeryV2" in stdout
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} >= {"individual", "task_arithmetic", "adamerging"}
    _run(
        "-m",
        "export.onnx",
        "--tasks",
        "all",
        "--bundle",
        str(out / "bundle"),
        "--out",
        str(out / "onnx"),
        "--per-task",
    )
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4
    served = _run(
        "-m",
        "runtime.demo",
        "--model",
        str(out / "onnx"),
        "--text",
        "the eagle rested happily on the ridge at dawn.",
    )
    assert "Predict(task='*')" in served and "exited with code 0" in served
    for task in ("creature", "place", "time", "feeling"):
        assert f"Predict(task='{task}')" in served
