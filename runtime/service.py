"""The gRPC servicer: validate the request, preprocess it off the event loop, queue it.

Thin on purpose: preprocessing lives in runtime.preprocess, batching in runtime.batcher and the
graph in runtime.engine. `InferenceModel` ties them together without any network so tests and
benchmarks can drive it directly.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.batcher import Batcher, DeadlineExpired
from runtime.engine import Engine
from runtime.manifest import ModelSpec
from runtime.postprocess import prediction
from runtime.preprocess import InputError, Preprocessor, decode_tensor

ALL_TASKS = "*"


class TaskNotFound(LookupError):
    """The request names a task this server does not answer (NOT_FOUND)."""


@dataclass
class Work:
    """One request's share of a batch: its row, the tasks to run it for, and top_k."""

    row: np.ndarray
    task_indices: list[int]
    top_k: int


class InferenceModel:
    """The request -> predictions path, minus the transport."""

    def __init__(self, spec: ModelSpec, pre: Preprocessor, engine: Engine):
        self.spec = spec
        self.pre = pre
        self.engine = engine
        self.names = [t.name for t in spec.tasks]
        self._index = {t.name: i for i, t in enumerate(spec.tasks)}

    def resolve(self, task: str, top_k: int) -> tuple[list[int], int]:
        """Task name or "*" -> task indices; top_k 0 -> 1. Raises TaskNotFound / InputError."""
        if task == ALL_TASKS:
            indices = list(range(len(self.names)))
        elif task in self._index:
            indices = [self._index[task]]
        else:
            shown = repr(task) if task else "an empty task"
            raise TaskNotFound(
                f"unknown task {shown}; this server answers {self.names} or '*' for all of them"
            )
        limit = max(self.spec.tasks[i].num_classes for i in indices)
        if top_k < 0 or top_k > limit:
            raise InputError(
                f"top_k {top_k} is out of range; use 0..{limit} (the classes of "
                f"{task!r}; 0 means 1)"
            )
        return indices, top_k or 1

    def row(self, kind: str | None, value) -> np.ndarray:
        """The request's input oneof -> one model row. Runs in the preprocessing pool."""
        if kind == "image":
            return self.pre.image(value)
        if kind == "text":
            return self.pre.text(value)
        if kind == "tensor":
            return decode_tensor(self.pre, value.dtype, list(value.shape), value.data)
        raise InputError("request.input is empty; set input.image, input.text or input.tensor")

    def run_batch(self, works: list[Work]) -> list[list[pb.Prediction]]:
        """ONE graph execution for every row of every request -> each request's predictions."""
        rows, task_ids = [], []
        for w in works:
            rows.extend([w.row] * len(w.task_indices))
            task_ids.extend(w.task_indices)
        logits = self.engine.run(rows, task_ids)
        out, i = [], 0
        tasks = self.spec.tasks
        for w in works:
            out.append(
                [prediction(tasks[t], logits[i + j], w.top_k) for j, t in enumerate(w.task_indices)]
            )
            i += len(w.task_indices)
        return out

    def list_tasks(self) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(
            modality=self.spec.modality,
            tasks=[pb.TaskInfo(name=t.name, classes=list(t.classes)) for t in self.spec.tasks],
        )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, model: InferenceModel, batcher: Batcher, pool: ThreadPoolExecutor):
        self.model = model
        self.batcher = batcher
        self.pool = pool
        self._tasks_response = model.list_tasks()
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout: float | None) -> bool:
        """Refuse new Predicts (UNAVAILABLE) and wait for in-flight ones; False on timeout."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown; retry elsewhere"
            )
        self._active += 1
        self._idle.clear()
        try:
            code, message = await self._predict(request, context)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        if isinstance(message, pb.PredictResponse):
            return message
        await context.abort(code, message)

    async def _predict(self, request, context):
        """(None, response) on success, else (status code, error message)."""
        try:
            indices, top_k = self.model.resolve(request.task, request.top_k)
        except TaskNotFound as e:
            return grpc.StatusCode.NOT_FOUND, str(e)
        except InputError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        kind = request.input.WhichOneof("kind")
        value = getattr(request.input, kind) if kind else None
        loop = asyncio.get_running_loop()
        try:
            with self.batcher.expecting():
                row = await loop.run_in_executor(self.pool, self.model.row, kind, value)
                length = len(row) if row.ndim == 1 else 0  # text: tokens, padded per batch
                work = Work(row, indices, top_k)
                future = self.batcher.submit(work, len(indices), deadline, length)
            predictions = await future
        except InputError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except DeadlineExpired:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before inference"
        except Exception as e:
            return grpc.StatusCode.INTERNAL, f"inference failed: {type(e).__name__}: {e}"
        return None, pb.PredictResponse(predictions=predictions)

    async def ListTasks(self, request, context) -> pb.ListTasksResponse:
        return self._tasks_response
