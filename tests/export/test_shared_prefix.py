"""The fused graph computes what is shared once: distinct inputs + (input, task) rows, every
branch block k, both adapter forms, int8, and a profile that counts the backbone's matmuls."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.export.test_onnx import check_model_dir, export, inputs, run
from trainer.results.bundle import load_bundle

CPU = ["CPUExecutionProvider"]
LAYERS = 2  # the tiny backbones' blocks


def mixed_rows(num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows over 3 distinct inputs: input 1 asked for every task (a `*`), input 0 twice for
    the same task, input 2 once; not in input order."""
    index = [1] * num_tasks + [0, 2, 0]
    tasks = [*range(num_tasks), 1, 0, 1]
    order = np.random.default_rng(0).permutation(len(index))
    return np.asarray(index)[order], np.asarray(tasks)[order]


def expanded_logits(model, batch, index, tasks) -> np.ndarray:
    """PyTorch, every row on its own copy of its input: what the fan-out must equal."""
    rows = torch.as_tensor(index)
    with torch.no_grad():
        return model({k: v[rows] for k, v in batch.items()}, torch.as_tensor(tasks)).numpy()


def manifest_of(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_branch_block(kind, k, make_bundle, tmp_path):
    """SurgeryV2 with branch block k exports, passes the parity bar on distinct + repeated
    inputs, and a `*` batch with repeats equals the expanded PyTorch computation."""
    bundle = make_bundle(kind, "surgeryv2", k)
    out = tmp_path / "onnx"
    form = "gather" if k % 2 else "masked"
    assert export(bundle, out, "--adapter-form", form) == 0
    manifest = check_model_dir(out, bundle)
    assert manifest["source_bundle"]["surgery"]["branch_block"] == k
    assert manifest["shared_blocks"] == k
    assert manifest["adapter_form"] == {"form": form, "choice": form, "reason": "asked for"}
    assert manifest["parity"]["rows_sharing_an_input"] > 0
    model, _ = load_bundle(bundle)
    assert model.branch_block == k
    batch = inputs(model, 3, 11, 6)
    index, tasks = mixed_rows(len(model.task_names))
    got = run(out / "model.onnx", batch, tasks, index)
    want = expanded_logits(model, batch, index, tasks)
    assert got.shape == (len(index), want.shape[1])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_adapter_forms_agree_and_auto_measures(make_bundle, tmp_path):
    bundle = make_bundle("text", "surgeryv2")
    model, _ = load_bundle(bundle)
    batch = inputs(model, 3, 5, 9)
    index, tasks = mixed_rows(len(model.task_names))
    logits = {}
    for form in ("masked", "gather", "auto"):
        out = tmp_path / form
        assert export(bundle, out, "--adapter-form", form) == 0
        logits[form] = run(out / "model.onnx", batch, tasks, index)
    np.testing.assert_allclose(logits["masked"], logits["gather"], atol=1e-5, rtol=0)
    record = manifest_of(tmp_path / "auto")["adapter_form"]
    assert record["choice"] == "auto" and set(record["timings_ms"]) == {"masked", "gather"}
    assert record["form"] == min(record["timings_ms"], key=record["timings_ms"].get)
    assert record["held_out"]["rows"] > record["held_out"]["distinct_inputs"]
    # the graph holds only the chosen form: a gather graph has no [D, T*r] task mask
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "gather" / "model.onnx")).graph.node)
    assert "OneHot" not in ops and "Equal" not in ops and ops["Gather"] > 2


def test_no_adapters_records_no_form(make_bundle, tmp_path):
    out = tmp_path / "onnx"
    assert export(make_bundle("text", "none"), out) == 0
    assert manifest_of(out)["adapter_form"]["form"] is None
    assert manifest_of(out)["shared_blocks"] == LAYERS


@pytest.mark.parametrize("kind", ["text", "image"])
def test_int8(kind, make_bundle, tmp_path):
    """int8 weights in the backbone's linear layers only; adapters and heads stay fp32; parity
    is top-1 agreement against PyTorch."""
    bundle = make_bundle(kind, "surgeryv2")
    out = tmp_path / "onnx"
    assert export(bundle, out, "--precision", "int8", "--adapter-form", "gather") == 0
    manifest = check_model_dir(out, bundle, "int8")
    record = manifest["int8"]
    # at least the MLP's two and the attention's input projection per block (open_clip's
    # attention output projection is a Gemm, which dynamic quantization leaves alone)
    assert record["quantized_matmuls"] >= 3 * LAYERS and record["fp32_matmuls"] > 0
    assert manifest["parity"]["bar"] == {"top1_agreement": 0.95}
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulInteger"] == record["quantized_matmuls"]
    model, _ = load_bundle(bundle)
    dtypes = {}
    for i in graph.initializer:
        dtypes.setdefault(tuple(i.dims), set()).add(i.data_type)
    for adapters in (model.block_adapters, model.final_adapter):  # per position [T, r, D]
        for shape in (adapters.down.shape[1:], adapters.up.shape[1:]):
            assert dtypes[tuple(shape)] == {onnx.TensorProto.FLOAT}
    batch = inputs(model, 6, 2, 8)
    index, tasks = np.arange(6), np.array([0, 1, 2, 2, 1, 0])
    got = run(out / "model.onnx", batch, tasks, index)
    want = expanded_logits(model, batch, index, tasks)
    for row, t in enumerate(tasks):
        c = model.heads.num_classes[t]
        assert (got[row, c:] <= -9000).all()
        assert np.abs(got[row, :c] - want[row, :c]).max() < 0.5


def _matmul_rows(path, feed, rows: set[int]) -> list[int]:
    """How many rows (1 input or R rows, from ``rows``) the activation of every MatMul with a
    constant weight (the backbone's linear layers) held in one profiled run, in graph order;
    graph optimisations off so the executed nodes are the graph's own. The row count is the
    first dimension, or the second where the first is the tokens (open_clip's [S, N, D])."""
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    linear = {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=CPU)
    session.run(["logits"], feed)
    events = json.loads(open(session.end_profiling()).read())
    seen = []
    for event in events:
        args = event.get("args", {})
        name = event.get("name", "").removesuffix("_kernel_time")
        if event.get("cat") == "Node" and name in linear and "input_type_shape" in args:
            shape = next(iter(args["input_type_shape"][0].values()))
            seen.append(shape[0] if shape[0] in rows else shape[1])
    assert len(seen) == len(linear), "every linear layer ran once"
    return seen


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize(
    "mode,k,shared", [("none", 0, 2), ("surgery", 0, 2), ("surgeryv2", 0, 0), ("surgeryv2", 1, 1)]
)
def test_star_runs_shared_blocks_once(kind, mode, k, shared, make_bundle, tmp_path):
    """A `*` batch (ONE input, T rows): the linear layers of the shared blocks see 1 row, the
    rest T. For none/surgery bundles that is the whole backbone: one pass plus T heads."""
    bundle = make_bundle(kind, mode, k)
    out = tmp_path / "onnx"
    assert export(bundle, out, "--adapter-form", "gather") == 0
    model, _ = load_bundle(bundle)
    tasks = len(model.task_names)
    feed = {n: v.numpy() for n, v in inputs(model, 1, 3, 7).items()}
    feed["input_index"] = np.zeros(tasks, dtype=np.int64)
    feed["task_ids"] = np.arange(tasks, dtype=np.int64)
    seen = _matmul_rows(out / "model.onnx", feed, {1, tasks})
    assert set(seen) <= {1, tasks} and seen == sorted(seen)  # fan-out once, then rows
    per_block, after = divmod(len(seen), LAYERS)  # after: the ViT's pooled projection
    once = shared * per_block + (after if shared == LAYERS else 0)
    assert Counter(seen) == Counter({1: once, tasks: len(seen) - once}) - Counter()
    assert manifest_of(out)["shared_blocks"] == shared
