"""Export targets: the registry, the model directory (default) and the Triton repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import onnx as export_onnx
from export.targets import TARGETS, register
from export.targets.triton_model_config import parse_model_config
from trainer.results.bundle import load_bundle

TASKS = ["animals", "colours", "moods"]  # the tiny bundles' tasks (conftest)

REPO = Path(__file__).resolve().parents[2]


def export(bundle, out, *flags) -> int:
    return export_onnx.main(["--bundle", str(bundle), "--out", str(out), *flags])


def client_python() -> str:
    """The outside client's interpreter (tritonclient pins protobuf < 7): never skipped."""
    python = os.environ.get("DEEPSURGERY_CLIENT_PYTHON") or str(REPO / ".venv-client/bin/python")
    assert Path(python).is_file(), (
        f"{python} is missing: build it with make .venv-client/.installed "
        "(or set DEEPSURGERY_CLIENT_PYTHON)"
    )
    return python


def test_default_target_is_the_model_dir(make_bundle, tmp_path):
    bundle = make_bundle("text", "surgeryv2")
    assert export(bundle, tmp_path / "a", "--adapter-form", "masked") == 0
    assert export(bundle, tmp_path / "b", "--adapter-form", "masked", "--target", "modeldir") == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "model.onnx", "tokenizer.json"]
    for name in names[1:]:  # the same verified bytes either way
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("kind,mode", [("text", "surgeryv2"), ("image", "surgery")])
def test_triton_repository(kind, mode, make_bundle, tmp_path):
    bundle = make_bundle(kind, mode)
    out = tmp_path / "repo"
    flags = ["--target", "triton", "--name", "multi", "--max-batch", "16", "--max-queue", "64"]
    assert export(bundle, out, *flags) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = ["README.md", "multi/1/model.onnx", "multi/config.pbtxt", "multi/manifest.json"]
    assert files == sorted(expected + (["multi/tokenizer.json"] if kind == "text" else []))
    config = parse_model_config((out / "multi/config.pbtxt").read_text())
    assert (config.name, config.platform, config.max_batch_size) == (
        "multi",
        "onnxruntime_onnx",
        16,
    )
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.dynamic_batching.default_queue_policy.timeout_action == 0  # REJECT (DELAY = 1)
    inputs = {i.name: (i.data_type, list(i.dims), i.HasField("reshape")) for i in config.input}
    if kind == "text":  # TYPE_INT64 = 9, TYPE_FP32 = 11
        assert inputs == {
            "input_ids": (9, [-1], False),
            "attention_mask": (9, [-1], False),
            "task_ids": (9, [1], True),
        }
    else:
        assert inputs == {"pixel_values": (11, [3, 32, 32], False), "task_ids": (9, [1], True)}
    (logits,) = config.output
    assert (logits.name, logits.data_type, list(logits.dims)) == ("logits", 11, [4])
    manifest = json.loads((out / "multi/manifest.json").read_text())
    assert manifest["target"]["parity"]["top1_agreement"] == 1.0
    assert manifest["target"]["parity"]["max_abs_logit_diff"] <= 1e-4
    # the graph Triton runs: rows of two "requests" concatenated give each row its own answer
    model, _ = load_bundle(bundle)
    session = ort.InferenceSession(
        str(out / "multi/1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    raw = (
        ["a tiny text", "another one, longer than the first", "x"]
        if kind == "text"
        else list(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    )
    batch = {k: v.numpy() for k, v in model.backbone.collate(raw).items()}
    task_ids = np.array([2, 0, 1], dtype=np.int64)
    got = session.run(["logits"], {**batch, "task_ids": task_ids})[0]
    import torch

    with torch.no_grad():
        want = model({k: torch.from_numpy(v) for k, v in batch.items()}, torch.from_numpy(task_ids))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    readme = (out / "README.md").read_text()
    assert "task_ids" in readme and all(name in readme for name in TASKS)
    assert ("tokenizer.json" in readme) == (kind == "text")


def test_triton_config_parses_with_tritonclient(make_bundle, tmp_path):
    """The written config.pbtxt read by tritonclient's own generated model_config_pb2."""
    out = tmp_path / "repo"
    assert export(make_bundle("text", "none"), out, "--target", "triton") == 0
    script = (
        "import sys; from google.protobuf import text_format; "
        "from tritonclient.grpc import model_config_pb2 as m; "
        "c = text_format.Parse(open(sys.argv[1]).read(), m.ModelConfig()); "
        "print(c.name, c.platform, c.max_batch_size, len(c.input), "
        "c.dynamic_batching.default_queue_policy.max_queue_size)"
    )
    done = subprocess.run(
        [client_python(), "-c", script, str(out / "deepsurgery/config.pbtxt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["deepsurgery", "onnxruntime_onnx", "32", "3", "256"]


def test_unknown_target_is_one_line_and_writes_nothing(make_bundle, tmp_path, capsys):
    out = tmp_path / "o"
    assert export(make_bundle("text", "none"), out, "--target", "tensorrt") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --target 'tensorrt' is unknown; known targets: modeldir, triton"
    assert list(tmp_path.iterdir()) == []
    assert export(make_bundle("text", "none"), out, "--target", "triton", "--per-task") == 2
    assert "--per-task writes model-directory graphs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_new_target_is_one_registration(make_bundle, tmp_path):
    @register("graph-only", help="just the verified graph")
    def write(verified, out):
        out.mkdir()
        shutil.copyfile(verified.staging / verified.files[0], out / "graph.onnx")
        return out / "graph.onnx"

    try:
        assert export(make_bundle("image", "none"), tmp_path / "g", "--target", "graph-only") == 0
        assert [p.name for p in (tmp_path / "g").iterdir()] == ["graph.onnx"]
    finally:
        del TARGETS["graph-only"]


def test_vendored_schema_rejects_what_triton_rejects():
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError, match="max_batch"):
        parse_model_config('name: "m" max_batch: 4')
    assert sys.modules["export.targets.triton_model_config"].SOURCE.startswith("tritonclient")
