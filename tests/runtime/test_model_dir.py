"""Model-dir checks and provider choice, without a network."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.engine import CPU, CUDA, EngineError, choose_providers
from runtime.manifest import ModelDirError, load_model_dir


@pytest.fixture
def model_copy(text_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(text_model_dir, out)
    return out


def edit_manifest(root, fn):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def test_loads_fused_and_per_task(text_model_dir):
    spec = load_model_dir(text_model_dir)
    assert spec.fused and spec.graph.name == "model.onnx" and spec.modality == "text"
    assert [t.name for t in spec.tasks] == ["news", "stars"] and spec.max_classes == 5
    one = load_model_dir(text_model_dir, task="stars")
    assert not one.fused and one.graph.name == "stars.onnx" and "task_ids" not in one.input_names
    assert [(t.name, t.index) for t in one.tasks] == [("stars", 0)]


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m.update(modality="audio"), "modality"),
        (lambda m: m.update(tasks=[]), "tasks"),
        (lambda m: m["tasks"][1].update(index=5), "index"),
        (lambda m: m["tasks"][1].update(name="news"), "duplicate"),
        (lambda m: m["tasks"][0].update(num_classes=3), "num_classes"),
        (lambda m: m["inputs"].pop(), "task_ids"),
        (lambda m: m["preprocessing"].update(max_length=0), "max_length"),
        (lambda m: m.update(per_task={}), None),  # fused serving does not need per_task
    ],
)
def test_manifest_errors_name_the_problem(model_copy, edit, needle):
    edit_manifest(model_copy, edit)
    if needle is None:
        load_model_dir(model_copy)
        return
    with pytest.raises(ModelDirError, match=needle):
        load_model_dir(model_copy)


def test_tampered_tokenizer_and_per_task_graph_are_refused(model_copy):
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelDirError, match="tokenizer.json: sha256 mismatch"):
        load_model_dir(model_copy)


def test_missing_per_task_graph(model_copy):
    edit_manifest(model_copy, lambda m: m.update(per_task={}))
    with pytest.raises(ModelDirError, match="--per-task"):
        load_model_dir(model_copy, task="news")
    (model_copy / "model.onnx").unlink()
    with pytest.raises(ModelDirError, match="file not found"):
        load_model_dir(model_copy)


def test_provider_choice():
    gpu_build = [CUDA, CPU]
    assert choose_providers("auto", gpu_build, gpu_visible=True) == [CUDA, CPU]
    assert choose_providers("auto", gpu_build, gpu_visible=False) == [CPU]
    assert choose_providers("auto", [CPU], gpu_visible=True) == [CPU]
    assert choose_providers("cpu", gpu_build, gpu_visible=True) == [CPU]
    assert choose_providers("cuda", gpu_build, gpu_visible=False) == [CUDA, CPU]
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU], gpu_visible=True)
