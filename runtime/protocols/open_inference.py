"""The Open Inference Protocol (KServe v2, Triton's gRPC API): `inference.GRPCInferenceService`.

Every task of the served model dir is a model named after the task; its version is the served
numbered version dir ("1" for a plain model dir) and follows hot-swaps. Inputs (exactly one
per request, N rows):

- text models: `text`, BYTES, shape [N] (or [N, 1]): UTF-8 strings, tokenized by the server;
- image models: `image`, BYTES, shape [N] (or [N, 1]): encoded files (PNG, JPEG, ...), or
  `pixel_values`, FP32, shape [N, 3, H, W]: already preprocessed rows.

Outputs, in `raw_output_contents` (what tritonclient reads), only those the request lists
(all when it lists none): `label`, BYTES [N], the most likely class of each row, and
`probabilities`, FP32 [N, C], the softmax over the task's C classes in class order. The N rows
of a request are N rows in the batcher: they share batches with every other request,
deepsurgery.v1's included. Errors: an unknown model or version is NOT_FOUND; a wrong input
name, datatype or shape, 0 rows, data that disagrees with the shape and strings that are not
UTF-8 are INVALID_ARGUMENT, each naming what the model takes; a full queue is
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import math
import struct
import time
from importlib import metadata

import numpy as np

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from runtime.api import (
    Input,
    InvalidArgument,
    ModelInfo,
    NotFound,
    Request,
    ServingError,
    TaskInfo,
    Tensor,
)
from runtime.protocols.registry import Protocol, register

NAME = "open-inference"
SERVER_NAME = "deepsurgery"
PLATFORM = "onnxruntime_onnx"  # Triton's name for a model run by onnxruntime
OUTPUTS = ("label", "probabilities")
Metadata = pb.ModelMetadataResponse.TensorMetadata


def version_of(info: ModelInfo) -> str:
    """The served model dir's version as the protocol spells it ("1" for a plain dir)."""
    return str(info.version or 1)


def input_specs(info: ModelInfo) -> dict[str, tuple[str, list[int]]]:
    """The model's inputs: name -> (datatype, shape with -1 for any size)."""
    if info.modality == "text":
        return {"text": ("BYTES", [-1])}
    return {"image": ("BYTES", [-1]), "pixel_values": ("FP32", [-1, *info.row_shape])}


def output_specs(task: TaskInfo) -> dict[str, tuple[str, list[int]]]:
    return {"label": ("BYTES", [-1]), "probabilities": ("FP32", [-1, len(task.classes)])}


def describe(specs: dict[str, tuple[str, list[int]]]) -> str:
    return " or ".join(f"{name!r} ({dt} {shape})" for name, (dt, shape) in specs.items())


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES elements -> raw contents: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """Raw BYTES contents -> `count` elements; InvalidArgument unless they fill `raw` exactly."""
    out, pos, view = [], 0, memoryview(raw)
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidArgument(
                f"{where}: raw contents end after {i} of the {count} elements its shape says; "
                "the shape and the raw contents disagree (each element: a 4-byte "
                "little-endian length, then its bytes)"
            )
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise InvalidArgument(
                f"{where}: element {i} claims {n} bytes but {len(raw) - pos - 4} remain; the "
                "shape and the raw contents disagree"
            )
        out.append(bytes(view[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if pos != len(raw):
        raise InvalidArgument(
            f"{where}: {len(raw) - pos} bytes follow the {count} elements the shape says; "
            "the shape and the raw contents disagree"
        )
    return out


class OpenInference:
    """The Open Inference Protocol adapter of a core."""

    def __init__(self, core):
        self.core = core
        try:
            self.server_version = metadata.version("deepsurgery")
        except metadata.PackageNotFoundError:
            self.server_version = "0"

    def _model(self, name: str, version: str) -> tuple[ModelInfo, TaskInfo]:
        info = self.core.info()
        task = info.task(name)
        if task is None:
            shown = repr(name) if name else "an empty model name"
            raise NotFound(
                f"unknown model {shown}; this server's models are its tasks: "
                f"{[t.name for t in info.tasks]}"
            )
        if version and version != version_of(info):
            raise NotFound(
                f"model {name!r} version {version!r} is not served; version "
                f"{version_of(info)} is (or leave the version empty)"
            )
        return info, task

    async def ServerLive(self, request, deadline) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, deadline) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.core.info().ready)

    async def ModelReady(self, request, deadline) -> pb.ModelReadyResponse:  # noqa: N802
        try:
            info, _ = self._model(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=info.ready)

    async def ServerMetadata(self, request, deadline) -> pb.ServerMetadataResponse:  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version)

    async def ModelMetadata(self, request, deadline) -> pb.ModelMetadataResponse:  # noqa: N802
        info, task = self._model(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=task.name,
            versions=[version_of(info)],
            platform=PLATFORM,
            inputs=[
                Metadata(name=n, datatype=d, shape=s) for n, (d, s) in input_specs(info).items()
            ],
            outputs=[
                Metadata(name=n, datatype=d, shape=s) for n, (d, s) in output_specs(task).items()
            ],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, deadline) -> pb.ModelInferResponse:  # noqa: N802
        start = time.perf_counter()
        try:
            info, task = self._model(request.model_name, request.model_version)
            wanted = [o.name for o in request.outputs] or list(OUTPUTS)
            unknown = [n for n in wanted if n not in OUTPUTS]
            if unknown:
                raise InvalidArgument(
                    f"unknown output {unknown[0]!r} of model {task.name!r}; it returns "
                    f"{describe(output_specs(task))}"
                )
            inputs = self._rows(request, info, task)
        except ServingError as e:  # refused before the core: counted here
            self.core.record(request.model_name, e.code, time.perf_counter() - start, NAME)
            raise
        core_request = Request(task.name, tuple(inputs), 1, NAME)
        predictions = [row[0] for row in await self.core.infer(core_request, deadline)]
        response = pb.ModelInferResponse(
            model_name=task.name, model_version=version_of(info), id=request.id
        )
        rows = len(predictions)
        for name in dict.fromkeys(wanted):  # each once, in the order asked
            if name == "label":
                response.outputs.add(name=name, datatype="BYTES", shape=[rows])
                data = encode_bytes([p.label.encode() for p in predictions])
            else:
                classes = len(task.classes)
                response.outputs.add(name=name, datatype="FP32", shape=[rows, classes])
                data = np.asarray([p.probabilities for p in predictions], "<f4").tobytes()
            response.raw_output_contents.append(data)
        return response

    def _rows(self, request: pb.ModelInferRequest, info: ModelInfo, task: TaskInfo) -> list[Input]:
        """The request's one input tensor -> one core Input per row, checked against the
        model's inputs (name, datatype, shape, data)."""
        specs = input_specs(info)
        if len(request.inputs) != 1:
            raise InvalidArgument(
                f"model {task.name!r} takes exactly one input, {describe(specs)}; got "
                f"{len(request.inputs)} ({[t.name for t in request.inputs]})"
            )
        tensor = request.inputs[0]
        where = f"input {tensor.name!r}"
        if tensor.name not in specs:
            raise InvalidArgument(
                f"{where} is not an input of model {task.name!r}; it takes {describe(specs)}"
            )
        datatype, want = specs[tensor.name]
        if tensor.datatype != datatype:
            raise InvalidArgument(
                f"{where} has datatype {tensor.datatype or '(none)'}; model {task.name!r} "
                f"takes {datatype} {want}"
            )
        shape = list(tensor.shape)
        if datatype == "BYTES":
            ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
            expected = "[N] (or [N, 1])"
        else:
            ok = len(shape) == len(want) and shape[1:] == want[1:]
            expected = f"[N, {', '.join(map(str, want[1:]))}]"
        if not ok or any(s < 0 for s in shape):
            raise InvalidArgument(
                f"{where} has shape {shape}; model {task.name!r} takes {expected}"
            )
        rows = shape[0]
        if rows == 0:
            raise InvalidArgument(f"{where} has 0 rows; send at least one")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(
                    f"raw_input_contents has {len(request.raw_input_contents)} entries for one "
                    "input; send one per input, in the order of inputs"
                )
            raw = request.raw_input_contents[0]
            items = decode_bytes(raw, rows, where) if datatype == "BYTES" else raw
        elif datatype == "BYTES":
            items = list(tensor.contents.bytes_contents)
            if len(items) != rows:
                raise InvalidArgument(
                    f"{where} has {len(items)} bytes_contents for shape {shape} ({rows} rows); "
                    "the shape and the data disagree"
                )
        else:
            items = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        if datatype == "BYTES":
            return [self._bytes_row(tensor.name, i, b) for i, b in enumerate(items)]
        row_bytes = 4 * math.prod(want[1:])
        if len(items) != rows * row_bytes:
            raise InvalidArgument(
                f"{where} holds {len(items)} bytes; shape {shape} of FP32 needs "
                f"{rows * row_bytes} (raw little-endian, row-major)"
            )
        return [
            Input(
                "tensor",
                Tensor("float32", tuple(want[1:]), items[i * row_bytes : (i + 1) * row_bytes]),
            )
            for i in range(rows)
        ]

    @staticmethod
    def _bytes_row(name: str, i: int, data: bytes) -> Input:
        if name == "image":
            return Input("image", data)
        try:
            return Input("text", data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidArgument(
                f"input 'text' row {i} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                "send UTF-8 encoded strings"
            ) from None


register(
    Protocol(
        name=NAME,
        service=pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        messages=pb,
        add_to_server=pb_grpc.add_GRPCInferenceServiceServicer_to_server,
        adapter=OpenInference,
    )
)
