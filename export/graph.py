"""Trace the trainer's ``MultiTaskModel.forward`` into ONNX; fp16 and int8; CPU sessions.

The graphs are thin wrappers that turn positional tensors into the batch dict the trainer's
forward takes, so there is no second implementation of the forward pass: what is exported is
the exact module the trainer evaluated.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from modeldir import INPUT_INDEX, TASK_IDS, backbone_input_names
from trainer.errors import UserError
from trainer.surgery.model import MultiTaskModel

DEFAULT_OPSET = 18


def input_names(modality: str) -> list[str]:
    """The backbone's graph inputs, in the order the graph takes them (input_index and
    task_ids come last)."""
    return list(backbone_input_names(modality))


class FusedGraph(nn.Module):
    """(inputs... [N, ...], input_index [R], task_ids [R]) -> logits [R, C_max]: every task in
    one graph. Row r is task ``task_ids[r]`` on input ``input_index[r]``; the backbone up to the
    first task-specific operation runs once per distinct input (``model.shared_blocks``)."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model
        self.names = input_names(model.backbone.modality)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        *inputs, input_index, task_ids = tensors
        batch = dict(zip(self.names, inputs, strict=True))
        return self.model(batch, task_ids, input_index)


class SingleTaskGraph(nn.Module):
    """(inputs...) -> logits [B, num_classes]: one task's model (``--per-task``), no task_ids."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        if len(model.task_names) != 1:
            raise ValueError("SingleTaskGraph needs a model holding exactly one task")
        self.model = model
        self.names = input_names(model.backbone.modality)
        self.num_classes = model.heads.num_classes[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.names, inputs, strict=True))
        task_ids = inputs[0].new_zeros(inputs[0].shape[0], dtype=torch.long)  # [B]: task 0
        return self.model(batch, task_ids)[:, : self.num_classes]


def _dynamic_shapes(modality: str, fused: bool) -> tuple:
    """Dynamic N (distinct inputs), R (output rows) and, for text, S (sequence)."""
    inputs = torch.export.Dim("inputs")
    if modality == "image":
        specs = [{0: inputs}]
    else:
        sequence = torch.export.Dim("sequence")
        specs = [{0: inputs, 1: sequence}, {0: inputs, 1: sequence}]
    if fused:
        rows = torch.export.Dim("rows")
        specs += [{0: rows}, {0: rows}]
    return (tuple(specs),)  # the wrappers take *tensors: one positional slot holding them all


def export_graph(
    graph: nn.Module, example: tuple[torch.Tensor, ...], path: Path, opset: int = DEFAULT_OPSET
) -> None:
    """torch.export (dynamo) the wrapper to a single self-contained ``path``, dynamic N, R (and
    S). ``example`` must have N >= 2, R >= 2, N != R (and S >= 2): torch.export specialises
    dimensions of size 1 and would tie equal ones."""
    fused = isinstance(graph, FusedGraph)
    names = list(graph.names) + ([INPUT_INDEX, TASK_IDS] if fused else [])
    graph = graph.eval()
    log = io.StringIO()
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(log),
        _quiet("onnx_ir", "onnxscript", "torch.onnx"),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=_dynamic_shapes(graph.model.backbone.modality, fused),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's libraries log every pass (one line per deduplicated initializer) at
    INFO; a caller whose logging is at INFO should not see them."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def convert_to_fp16(path: Path) -> list[str]:
    """fp32 graph -> fp16 weights and activations, in place; inputs/outputs stay float32
    (the runtime feeds float32 pixel_values and reads float32 logits). Returns the op types
    kept in fp32 beyond onnxruntime's default block list."""
    # onnxruntime.transformers is a large package of its own that only fp16 exports need
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(path))
    kept = []
    if any(node.op_type == "Conv" for node in model.graph.node):
        # measured (onnxruntime 1.31, CPU): fp16 Transposes in a graph holding a Conv crash the
        # NchwcTransformer at session creation (segfault); the ViT's Transposes stay fp32
        kept = ["Transpose"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # constants beyond fp16's range (e.g. finfo(float32).min in the attention mask) are
        # clipped to ±65504, which still masks; padding logits (-1e4) are exact in fp16
        model16 = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *kept]
        )
    # the converter appends the input Casts after their consumers; the checker wants order
    OnnxModel.graph_topological_sort(model16.graph)
    onnx.save(model16, str(path))
    return kept


def convert_to_int8(path: Path) -> dict:
    """fp32 graph -> int8, in place, with onnxruntime's dynamic quantization: the MatMuls
    whose weight is a constant (the backbone's linear layers, nearly all of its FLOPs) get int8
    weights (per output channel, symmetric) and uint8 activations quantized on the fly per batch.
    Everything else stays fp32: the adapters and heads (their weights are gathered per row,
    so they are not constants), the attention score MatMuls, embeddings, LayerNorm, softmax.
    Dynamic, not static: no calibration data is needed and each batch gets its own activation
    range. Returns what was quantized, for the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path))
    constants = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    total = sum(n.op_type == "MatMul" for n in model.graph.node)
    root = logging.getLogger()  # the quantizer logs a pre-processing hint on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            model,
            str(path),
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8, per output channel, symmetric",
        "activations": "uint8, dynamic (range of each batch)",
        "quantized_matmuls": len(nodes),
        "fp32_matmuls": total - len(nodes),
        "kept_fp32": "adapters, heads, attention scores, embeddings, normalisation",
    }


def probe_session(path: Path) -> None:
    """Create a CPU session for ``path`` in a child process first: an onnxruntime crash
    (segfault) on a graph it cannot handle must become an error, not kill the export."""
    code = (
        "import sys, onnxruntime as ort; o = ort.SessionOptions(); o.log_severity_level = 3; "
        "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if result.returncode < 0:
        raise UserError(
            f"onnxruntime's CPU provider crashes (signal {-result.returncode}) loading the fp16 "
            "graph; export with --precision fp32"
        )


def check_graph(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


def cpu_session(path: Path, threads: int = 0, precision: str = "fp32"):
    """An onnxruntime session on the CPU provider; a graph with ops that have no kernel for its
    precision becomes a one-line UserError."""
    if precision == "fp16":
        probe_session(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (NotImplemented, Fail)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if precision == "fp16":
            raise UserError(
                f"the fp16 graph cannot run on onnxruntime's CPU provider ({first}); "
                "export with --precision fp32"
            ) from None
        raise UserError(f"onnxruntime cannot load the exported graph: {first}") from None
