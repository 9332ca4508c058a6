"""``--target triton``: a Triton Inference Server model repository.

    OUT/README.md                  what a client must do in front of the model
    OUT/<name>/config.pbtxt        platform onnxruntime_onnx, dynamic batching with a queue policy
    OUT/<name>/1/model.onnx        the verified fused graph, one row per input
    OUT/<name>/manifest.json       tasks, class names, preprocessing, parity (deepsurgery's)
    OUT/<name>/tokenizer.json      text models: the tokenizer to run in front

Triton's dynamic batcher concatenates requests along dimension 0 of every input, so an input
that indexes rows of another (the model directory's ``input_index``: several tasks asked of
one input share its backbone pass) would point into the wrong request after concatenation.
The graph written here computes ``input_index`` = 0..R-1 in-graph instead (every row its own
input), and is re-verified against the PyTorch reference before anything is written. Inputs'
and the output's dims and dtypes are read from that graph; ``config.pbtxt`` is parsed against
Triton's own ``ModelConfig`` schema (``triton_model_config``) before it is kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from modeldir import (
    INPUT_INDEX,
    MANIFEST,
    TASK_IDS,
    atomic_directory,
    sha256_file,
    write_json_atomic,
)
from trainer.errors import UserError

from .registry import VerifiedExport, register
from .triton_model_config import parse_model_config

PLATFORM = "onnxruntime_onnx"
VERSION = "1"
README = "README.md"
# ONNX element type -> Triton's DataType name (model_config.proto)
DATA_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.BOOL: "TYPE_BOOL",
}


def without_input_index(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused graph with ``input_index`` computed as Range(0, rows) from ``task_ids``'s
    length instead of taken as an input: every row reads its own input."""
    graph = model.graph
    names = [i.name for i in graph.input]
    if INPUT_INDEX not in names:
        return model
    del graph.input[names.index(INPUT_INDEX)]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "triton_zero"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "triton_one"),
        ]
    )
    nodes = [
        helper.make_node("Shape", [TASK_IDS], ["triton_rows_shape"]),
        helper.make_node("Gather", ["triton_rows_shape", "triton_zero"], ["triton_rows"], axis=0),
        helper.make_node("Range", ["triton_zero", "triton_rows", "triton_one"], [INPUT_INDEX]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return model


def _tensor(value: onnx.ValueInfoProto, what: str) -> dict:
    """A graph input/output -> Triton's (name, data_type, dims without the batch dimension)."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in DATA_TYPES:
        raise UserError(
            f"{what} '{value.name}' has ONNX type {TensorProto.DataType.Name(tensor.elem_type)}, "
            "which this writer does not map to a Triton data type"
        )
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
    return {"name": value.name, "data_type": DATA_TYPES[tensor.elem_type], "dims": dims}


def _entry(tensor: dict) -> str:
    # a [B] tensor: Triton needs a non-empty dims; [1] per row, reshaped to the graph's []
    dims = tensor["dims"] or [1]
    reshape = "\n    reshape: { shape: [ ] }" if not tensor["dims"] else ""
    return (
        f'  {{\n    name: "{tensor["name"]}"\n    data_type: {tensor["data_type"]}\n'
        f"    dims: [ {', '.join(str(d) for d in dims)} ]{reshape}\n  }}"
    )


def model_config(
    name: str,
    model: onnx.ModelProto,
    max_batch: int,
    max_queue: int,
    max_delay_ms: float,
) -> str:
    """``config.pbtxt`` for the graph: its inputs and output, dynamic batching (rows of any
    requests, at most ``max_delay_ms`` of waiting) and a queue policy that rejects beyond
    ``max_queue`` waiting requests instead of letting latency grow without bound."""
    inputs = [_tensor(v, "input") for v in model.graph.input]
    outputs = [_tensor(v, "output") for v in model.graph.output]
    return (
        f'name: "{name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n" + ",\n".join(_entry(t) for t in inputs) + "\n]\n"
        "output [\n" + ",\n".join(_entry(t) for t in outputs) + "\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {round(max_delay_ms * 1000)}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {max_queue}\n"
        "  }\n"
        "}\n"
        f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n"
    )


def readme(name: str, manifest: dict, config: str) -> str:
    """What a client must put in front of the graph (tokenization or image preprocessing,
    task ids, the padding columns of the output), from the manifest."""
    pre = manifest["preprocessing"]
    tasks = "\n".join(
        f"| {t['index']} | {t['name']} | {t['num_classes']} | {', '.join(t['classes'])} |"
        for t in manifest["tasks"]
    )
    if manifest["modality"] == "text":
        front = (
            f"Tokenize each text with `{name}/tokenizer.json` (Hugging Face `tokenizers`), "
            f"truncated to {pre.get('max_length')} tokens, padded with id "
            f"{pre.get('pad_token_id', 0)}: `input_ids` and `attention_mask`, int64, one row per "
            "text. Triton batches only requests of equal shape: pad every request to "
            f"{pre.get('max_length')} tokens so that requests of different lengths share batches."
        )
    else:
        front = (
            "Decode each image to RGB and apply the manifest's `preprocessing`: "
            f"resize ({pre.get('resize', 'shortest_edge_then_center_crop')}, "
            f"{pre.get('interpolation')}), centre crop to {pre.get('image_size')}, scale to "
            f"[0, 1], normalise with mean {pre.get('mean')} and std {pre.get('std')}: "
            "`pixel_values`, float32, [3, H, W] per image."
        )
    return f"""# Triton model repository: `{name}`

Written by `python -m export.onnx --target triton` from a deepsurgery bundle: one ONNX graph
(`{name}/{VERSION}/model.onnx`, platform `{PLATFORM}`) serving every task below; its parity
with the PyTorch model was verified at export (`{name}/{MANIFEST}`, `parity`).

    tritonserver --model-repository=<this folder>

## What a client must do in front of it

The graph takes tensors, not raw inputs (`python -m runtime.server` does this itself):

1. {front}
2. `task_ids`: int64, one per row, the index of the task asked (table below). Ask several
   tasks of one input by sending it once per task.
3. The output `logits` [rows, {max(t["num_classes"] for t in manifest["tasks"])}] holds each
   task's classes first; the remaining columns are padding ({PAD_NOTE}). Softmax over a row's
   first `classes` columns gives its probabilities.

| task_ids | task | classes | class names |
|---|---|---|---|
{tasks}

## config.pbtxt

```
{config.rstrip()}
```
"""


PAD_NOTE = "a large negative value: never the top-1"


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(
            f"--name '{name}' is not a usable Triton model name; use letters, digits, '_', '.', '-'"
        )
    return name


@register("triton", help="a Triton Inference Server model repository (config.pbtxt + model.onnx)")
def write(verified: VerifiedExport, out: Path) -> Path:
    options = verified.options
    name = _safe_name(str(options.get("name", "deepsurgery")))
    max_batch, max_queue = int(options.get("max_batch", 32)), int(options.get("max_queue", 256))
    max_delay_ms = float(options.get("max_delay_ms", 5.0))
    if max_batch < 1 or max_queue < 1 or max_delay_ms < 0:
        raise UserError(
            f"--max-batch ({max_batch}) and --max-queue ({max_queue}) must be >= 1 and "
            f"--max-delay-ms ({max_delay_ms:g}) >= 0"
        )
    graph_file = verified.files[0]
    model = without_input_index(onnx.load(str(verified.staging / graph_file)))
    config = model_config(name, model, max_batch, max_queue, max_delay_ms)
    try:  # validated against Triton's own schema before anything is kept
        parse_model_config(config)
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc
    manifest = dict(verified.manifest)
    with atomic_directory(out) as tmp:
        version = tmp / name / VERSION
        version.mkdir(parents=True)
        onnx.save(model, str(version / "model.onnx"))
        parity = verified.check(version / "model.onnx", f"{name}/{VERSION}/model.onnx")
        for extra in verified.files[1:]:  # tokenizer.json
            shutil.copyfile(verified.staging / extra, tmp / name / extra)
        (tmp / name / "config.pbtxt").write_text(config)
        manifest["sha256"] = {
            **{f: h for f, h in manifest["sha256"].items() if f != graph_file},
            f"{VERSION}/model.onnx": sha256_file(version / "model.onnx"),
        }
        manifest["inputs"] = [i for i in manifest["inputs"] if i["name"] != INPUT_INDEX]
        manifest["target"] = {
            "name": "triton",
            "model": name,
            "graph": "input_index computed in-graph (every row its own input)",
            "parity": parity,
        }
        write_json_atomic(tmp / name / MANIFEST, manifest)
        (tmp / README).write_text(readme(name, manifest, config))
    return out / name / VERSION / "model.onnx"
