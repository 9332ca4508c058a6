"""The serving core's plain types: what a request is, what it answers, and how it fails.

Every protocol (deepsurgery.v1, the Open Inference Protocol) and every transport (grpc.aio in
runtime.server, Ray Serve in runtime.serve_ray) converts its own messages to these at the
edge, as Triton's Python backend takes `execute(requests) -> responses` on its own types.
Nothing here imports grpc or protobuf: the core is testable and reusable without a network.

Errors carry a `code`, the name of the gRPC status an adapter answers with (every protocol
served here is gRPC; an HTTP adapter would map the same names to 404/400/429/504/503/500).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALL_TASKS = "*"


class ServingError(Exception):
    """A request the core cannot answer; `code` names the status, the message says the fix."""

    code = "INTERNAL"


class NotFound(ServingError, LookupError):
    """The request names a task (model) this server does not answer."""

    code = "NOT_FOUND"


class InvalidArgument(ServingError, ValueError):
    """The request's inputs or options are malformed; nothing was queued."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(ServingError):
    """The queue is at its bound; retry with backoff or add replicas."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its batch ran."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(ServingError):
    """The server is draining for shutdown (or no replica answers); retry elsewhere."""

    code = "UNAVAILABLE"


class Internal(ServingError):
    """Inference itself failed (a bug or a broken graph), not the request."""

    code = "INTERNAL"


@dataclass(frozen=True)
class Tensor:
    """An already-preprocessed row without the batch dimension: float32 [3, H, W] pixel
    values (image models) or int64 [S] token ids (text models), raw little-endian bytes."""

    dtype: str  # "float32" | "int64"
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Input:
    """One input row: `kind` "text" (value: str), "image" (value: the encoded file's bytes) or
    "tensor" (value: Tensor)."""

    kind: str
    value: str | bytes | Tensor


@dataclass(frozen=True)
class Request:
    """Classify each of `inputs` for `task` (a task name, or "*" for every task).

    `top_k` 0 means 1. `protocol` labels the request in the metrics. A request of N inputs is
    N rows in the batcher: they may share batches with any other request's rows."""

    task: str
    inputs: tuple[Input, ...]
    top_k: int = 0
    protocol: str = "deepsurgery.v1"


@dataclass
class Prediction:
    """One task's answer for one input row."""

    task: str
    label: str  # the most likely class
    score: float  # its softmax probability
    top: list[tuple[str, float]]  # top_k (label, probability), most likely first
    logits: np.ndarray  # float32 [C]: this task's classes only, in class order
    probabilities: np.ndarray  # float64 [C]: softmax over this task's classes


@dataclass(frozen=True)
class TaskInfo:
    name: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What the served model dir offers, for metadata RPCs: it changes on a hot-swap."""

    modality: str  # "text" | "image"
    version: int | None  # the numbered version dir served (None: a plain model dir)
    tasks: tuple[TaskInfo, ...]
    row_shape: tuple[int, ...] | None = None  # image: (3, H, W); text: None (S varies)
    ready: bool = True  # False while draining for shutdown

    def task(self, name: str) -> TaskInfo | None:
        for t in self.tasks:
            if t.name == name:
                return t
        return None
