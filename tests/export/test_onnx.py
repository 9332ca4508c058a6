"""python -m export.onnx on tiny bundles: both backbones, surgery modes, fp32/fp16, task subsets,
per-task graphs, the parity bar and every bad input (one-line error, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import graph as export_graph
from export import onnx as export_onnx
from modeldir import sha256_file
from tests.export.conftest import TASKS, build_model
from trainer.errors import UserError
from trainer.results.bundle import load_bundle, write_bundle

CPU = ["CPUExecutionProvider"]


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=CPU)


def inputs(model, batch_size: int, seed: int, length: int = 0) -> dict[str, torch.Tensor]:
    """A batch for the model's backbone; text rows of ~``length`` words, padded in the batch."""
    rng = np.random.default_rng(seed)
    if model.backbone.modality == "text":
        words = "the cat sat on a mat near red blue happy sad trains and buses".split()
        texts = [" ".join(rng.choice(words, size=max(1, length - i))) for i in range(batch_size)]
        return model.backbone.collate(texts)
    images = rng.integers(0, 256, (batch_size, 40, 48, 3), dtype=np.uint8)
    return model.backbone.collate(list(images))


def torch_logits(model, batch, task_ids) -> np.ndarray:
    with torch.no_grad():
        return model(batch, torch.as_tensor(task_ids)).numpy()


def run(path, batch, task_ids=None, input_index=None) -> np.ndarray:
    """The graph's logits; fused graphs get ``input_index`` (default: row r reads input r)."""
    feed = {k: v.numpy() for k, v in batch.items()}
    if task_ids is not None:
        feed["task_ids"] = np.asarray(task_ids, dtype=np.int64)
        if input_index is None:
            input_index = np.arange(len(task_ids))
        feed["input_index"] = np.asarray(input_index, dtype=np.int64)
    return session(path).run(["logits"], feed)[0]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_attention_adapters_round_trip_and_export(kind, tiny_bert_dir, tmp_path):
    """SurgeryV2 with attention adapters: the bundle rebuilds them (manifest flag, weights) and
    the fused graph, and a task subset's, match PyTorch under the parity bar."""
    model = build_model(kind, "surgeryv2", tiny_bert_dir, seed=3, attention_adapters=True)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model, list(TASKS.values()), {"suite": "tiny"})
    assert json.loads((bundle / "manifest.json").read_text())["surgery"]["attention_adapters"]
    reloaded, _ = load_bundle(bundle)
    assert torch.equal(reloaded.attention_adapters.up, model.attention_adapters.up)
    batch = inputs(reloaded, 5, 2, 9)
    task_ids = [0, 2, 1, 1, 2]
    np.testing.assert_allclose(
        torch_logits(reloaded, batch, task_ids), torch_logits(model, batch, task_ids), atol=1e-6
    )
    assert export(bundle, tmp_path / "onnx") == 0
    check_model_dir(tmp_path / "onnx", bundle)
    check_dynamic(tmp_path / "onnx", reloaded, 1e-4)
    assert export(bundle, tmp_path / "subset", "--tasks", "moods") == 0
    got = run(tmp_path / "subset" / "model.onnx", batch, [0] * 5)
    np.testing.assert_allclose(got, torch_logits(reloaded, batch, [2] * 5), atol=1e-4, rtol=0)


def export(bundle, out, *flags) -> int:
    return export_onnx.main(["--bundle", str(bundle), "--out", str(out), *flags])


def parity_rows(tasks: int) -> int:
    """Rows of the held-out parity batches: 8 distinct inputs per task in batches of 16 and 7
    inputs, each input asked for its own task, plus per batch every task for its first input,
    its second input once more and its third for one more task."""
    rows, left, sizes = 0, 8 * tasks, [16, 7]
    while left:
        size = min(sizes[0], left)
        rows += size + tasks + (size > 1) + (size > 2)
        left, sizes = left - size, sizes[::-1]
    return rows


def check_model_dir(out, bundle, precision="fp32"):
    """The runtime's contract: files, sha256s, tasks, inputs/outputs, recorded parity."""
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((bundle / "manifest.json").read_text())
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert manifest["format_version"] == 1 and manifest["modality"] == source["modality"]
    assert (
        manifest["precision"] == precision and manifest["preprocessing"] == source["preprocessing"]
    )
    for name, digest in manifest["sha256"].items():
        assert sha256_file(out / name) == digest
    graph = session(out / "model.onnx")
    names = [i["name"] for i in manifest["inputs"]]
    assert [i.name for i in graph.get_inputs()] == names and names[-2:] == [
        "input_index",
        "task_ids",
    ]
    assert [(i.type, i.shape[0]) for i in graph.get_inputs()][-2:] == [
        ("tensor(int64)", "rows"),
        ("tensor(int64)", "rows"),
    ]
    assert graph.get_inputs()[0].shape[0] == "inputs"
    assert graph.get_outputs()[0].type == "tensor(float)"  # fp16 graphs too: fp32 I/O
    if manifest["modality"] == "text":
        assert names == ["input_ids", "attention_mask", "input_index", "task_ids"]
        assert manifest["inputs"][0]["shape"] == ["inputs", "sequence"]
        assert sha256_file(out / "tokenizer.json") == source["sha256"]["tokenizer.json"]
        assert manifest["sha256"]["tokenizer.json"]
    else:
        assert graph.get_inputs()[0].type == "tensor(float)"
        assert manifest["inputs"][0]["shape"] == ["inputs", 3, 32, 32]
    c_max = max(t["num_classes"] for t in manifest["tasks"])
    assert manifest["outputs"][0]["shape"] == ["rows", c_max]
    parity = manifest["parity"]
    tasks = len(manifest["tasks"])
    synth = parity["synthesized"]
    assert synth["distinct_inputs"] == 8 * tasks
    assert synth["rows"] == parity_rows(tasks)
    assert synth["rows_sharing_an_input"] == synth["rows"] - synth["distinct_inputs"]
    assert parity["rows_sharing_an_input"] == parity["rows"] - parity["distinct_inputs"]
    if "real" not in parity:
        assert parity["judged_on"] == "synthesized" and parity["rows"] == synth["rows"]
    assert set(parity["tasks"]) == {t["name"] for t in manifest["tasks"]}
    if precision == "fp32":
        assert parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    elif precision == "fp16":
        assert parity["top1_agreement"] >= 0.995
    else:
        assert parity["top1_agreement"] >= 0.95
    assert manifest["source_bundle"]["manifest_sha256"] == sha256_file(bundle / "manifest.json")
    return manifest


def check_dynamic(out, model, tol: float):
    """model.onnx at several batch sizes (and sequence lengths) against PyTorch."""
    for seed, (batch_size, length) in enumerate(((1, 3), (5, 11), (2, 20))):
        batch = inputs(model, batch_size, seed, length)
        task_ids = np.arange(batch_size) % len(model.task_names)
        want, got = torch_logits(model, batch, task_ids), run(out / "model.onnx", batch, task_ids)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tol
        assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("kind", ["text", "image"])
def test_fused_and_per_task_graphs(kind, make_bundle, tmp_path, monkeypatch):
    """Defaults (newest runs/*/bundle, out beside it) plus --per-task graphs equal to the fused
    graph with that task id."""
    bundle = make_bundle(kind, "surgeryv2")
    runs = tmp_path / "runs"
    shutil.copytree(bundle, runs / "latest" / "bundle")
    monkeypatch.chdir(tmp_path)
    assert export_onnx.main(["--tasks", "all", "--per-task"]) == 0
    out = runs / "latest" / "onnx"
    manifest = check_model_dir(out, runs / "latest" / "bundle")
    model, _ = load_bundle(bundle)
    check_dynamic(out, model, 1e-4)
    assert set(manifest["per_task"]) == set(model.task_names)
    batch = inputs(model, 4, 7, 9)
    for task in manifest["tasks"]:
        file = manifest["per_task"][task["name"]]
        assert manifest["sha256"][file] == sha256_file(out / file)
        single = session(out / file)
        assert "task_ids" not in [i.name for i in single.get_inputs()]
        fused = run(out / "model.onnx", batch, [task["index"]] * 4)[:, : task["num_classes"]]
        alone = run(out / file, batch)
        assert alone.shape == (4, task["num_classes"])
        np.testing.assert_allclose(alone, fused, atol=1e-5, rtol=0)
        assert manifest["parity"]["per_task_graphs"][task["name"]]["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("kind,mode", [("text", "none"), ("text", "surgery"), ("image", "none")])
def test_surgery_modes(kind, mode, make_bundle, tmp_path):
    bundle = make_bundle(kind, mode)
    assert export(bundle, tmp_path / "onnx") == 0
    check_model_dir(tmp_path / "onnx", bundle)
    model, _ = load_bundle(bundle)
    check_dynamic(tmp_path / "onnx", model, 1e-4)


@pytest.mark.parametrize("kind,mode", [("text", "surgeryv2"), ("image", "surgeryv2")])
def test_fp16(kind, mode, make_bundle, tmp_path):
    bundle = make_bundle(kind, mode)
    assert export(bundle, tmp_path / "onnx", "--precision", "fp16") == 0
    out = tmp_path / "onnx"
    check_model_dir(out, bundle, "fp16")
    graph = onnx.load(str(out / "model.onnx"))
    dtypes = {i.data_type for i in graph.graph.initializer if len(i.dims) >= 2}
    assert onnx.TensorProto.FLOAT16 in dtypes and onnx.TensorProto.FLOAT not in dtypes
    model, _ = load_bundle(bundle)
    batch = inputs(model, 6, 3, 8)
    task_ids = np.array([0, 1, 2, 2, 1, 0])
    got, want = run(out / "model.onnx", batch, task_ids), torch_logits(model, batch, task_ids)
    assert got.dtype == np.float32
    for row, t in enumerate(task_ids):  # padding columns stay a large negative in fp16
        assert (got[row, model.heads.num_classes[t] :] <= -9000).all()
        assert (
            np.abs(
                got[row, : model.heads.num_classes[t]] - want[row, : model.heads.num_classes[t]]
            ).max()
            < 0.05
        )


def test_task_subset_renumbers(make_bundle, tmp_path):
    bundle = make_bundle("text", "surgeryv2")
    out = tmp_path / "onnx"
    assert export(bundle, out, "--tasks", "moods, animals") == 0
    manifest = check_model_dir(out, bundle)
    assert [(t["name"], t["index"], t["num_classes"]) for t in manifest["tasks"]] == [
        ("moods", 0, 4),
        ("animals", 1, 2),
    ]
    assert manifest["tasks"][1]["classes"] == ["cat", "dog"]
    model, _ = load_bundle(bundle)
    batch = inputs(model, 4, 5, 10)
    got = run(out / "model.onnx", batch, [0, 1, 1, 0])
    want = torch_logits(model, batch, [2, 0, 0, 2])  # the full model's ids of moods, animals
    np.testing.assert_allclose(got[[0, 3]], want[[0, 3], :4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[[1, 2], :2], want[[1, 2], :2], atol=1e-4, rtol=0)
    assert (got[[1, 2], 2:] == -1e4).all()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fault", ["max_abs", "top1"])
def test_parity_bar_is_enforced(fault, make_bundle, tmp_path, monkeypatch, capsys):
    """A PyTorch side that disagrees with the graph fails the export and leaves no --out."""
    real = export_onnx.reference_logits

    def disagreeing(graph, held_out):
        logits = real(graph, held_out)
        if fault == "max_abs":
            return [x + 1e-3 for x in logits]
        return [x[:, ::-1].copy() if i == 0 else x for i, x in enumerate(logits)]

    monkeypatch.setattr(export_onnx, "reference_logits", disagreeing)
    out = tmp_path / "onnx"
    assert export(make_bundle("image", "surgeryv2"), out) == 2
    assert "parity" in one_line_error(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_task(make_bundle, tmp_path, capsys):
    assert export(make_bundle("text", "none"), tmp_path / "o", "--tasks", "animals,plants") == 2
    err = one_line_error(capsys)
    assert "plants" in err and "animals, colours, moods" in err
    assert not (tmp_path / "o").exists()


def test_missing_bundle(tmp_path, capsys, monkeypatch):
    assert export(tmp_path / "nope", tmp_path / "o") == 2
    assert "does not exist" in one_line_error(capsys)
    monkeypatch.chdir(tmp_path)  # no --bundle and no runs/*/bundle
    assert export_onnx.main([]) == 2
    assert "no bundle found" in one_line_error(capsys)


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("incomplete", "tasks.safetensors: file not found"),
        ("corrupt", "backbone.safetensors: sha256 mismatch"),
        ("version", "format_version 2 is not supported"),
        ("tasks", "tasks[1].num_classes 7 != len(tasks[1].classes) 3"),
    ],
)
def test_broken_bundle(damage, needle, make_bundle, tmp_path, capsys):
    """The bundle is read through the shared modeldir checks: one-line errors naming the file."""
    bundle = tmp_path / "bundle"
    shutil.copytree(make_bundle("text", "none"), bundle)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "incomplete":
        (bundle / "tasks.safetensors").unlink()
    elif damage == "corrupt":
        data = bytearray((bundle / "backbone.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (bundle / "backbone.safetensors").write_bytes(data)
    elif damage == "version":
        path.write_text(json.dumps({**manifest, "format_version": 2}))
    else:
        manifest["tasks"][1]["num_classes"] = 7
        path.write_text(json.dumps(manifest))
    assert export(bundle, tmp_path / "o") == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(make_bundle, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(make_bundle("text", "none"), out) == 2
    assert "--force" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_fp16_op_without_kernel(make_bundle, tmp_path, monkeypatch, capsys):
    """onnxruntime refusing an fp16 node becomes a one-line error; nothing is written."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    def refuse(*args, **kwargs):
        raise OrtNotImplemented(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
            "implementation for Erf(13) node with name 'n0'\nmore detail"
        )

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    out = tmp_path / "o"
    assert export(make_bundle("image", "none"), out, "--precision", "fp16") == 2
    err = one_line_error(capsys)
    assert "fp16" in err and "Erf" in err and "--precision fp32" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_onnxruntime_crash_on_fp16_graph_is_an_error(tmp_path, monkeypatch):
    """A graph that segfaults onnxruntime is probed in a child process, never in the export."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -11))
    with pytest.raises(UserError, match="crashes .*--precision fp32"):
        export_graph.cpu_session(tmp_path / "model.onnx", precision="fp16")
