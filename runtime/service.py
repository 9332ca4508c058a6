"""The gRPC servicer: validate the request, preprocess it off the event loop, queue it.

Thin on purpose: preprocessing lives in runtime.preprocess, batching in runtime.batcher and the
graph in runtime.engine. `InferenceModel` ties them together without any network so tests and
benchmarks can drive it directly. `Frontend` is the transport-free request path (admission,
preprocessing, queueing, metrics) that both the gRPC servicer here and the Ray Serve replicas
(runtime.serve_ray) use.

Hot-swap: every `Work` carries the model it was resolved against, and `run_works` runs each
model's works with that model, so a request queued before a swap is answered by the model that
accepted it while new requests go to the new one (`Frontend.swap`).

Shared inputs: a batch sends each distinct input to the graph once (`InferenceModel.run_batch`),
with one row per (input, task): a `*` request is ONE input and T rows, and requests whose
preprocessed inputs are identical (the same text, image bytes or tensor, from any clients
within one batch window) share it. The graph runs what precedes the first task-specific
operation once per distinct input.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.batcher import Batcher, DeadlineExpired, QueueFull
from runtime.engine import Engine
from runtime.manifest import ModelSpec
from runtime.postprocess import prediction
from runtime.preprocess import InputError, Preprocessor, decode_tensor

ALL_TASKS = "*"


class TaskNotFound(LookupError):
    """The request names a task this server does not answer (NOT_FOUND)."""


@dataclass
class Work:
    """One request's share of a batch: its input row, the tasks to run it for, top_k, the model
    that resolved it (None: the caller's run_batch decides) and the input's identity
    (``input_key``; empty: shared with no other work)."""

    row: np.ndarray
    task_indices: list[int]
    top_k: int
    model: InferenceModel | None = None
    key: bytes = b""


def input_key(row: np.ndarray) -> bytes:
    """The identity of a preprocessed input: equal keys mean byte-identical rows of the same
    shape and dtype, so they may share one pass. 128-bit BLAKE2b: collisions are out of reach
    and hashing costs about a millisecond per MB, next to a backbone pass."""
    digest = hashlib.blake2b(row.tobytes(), digest_size=16)
    digest.update(f"{row.dtype.str}{row.shape}".encode())
    return digest.digest()


def _slot_key(work: Work):
    return work.key or ("work", id(work))


def count_inputs(works: list[Work]) -> int:
    """Distinct inputs among ``works`` (per model): what the graph executions receive."""
    return len({(id(w.model), _slot_key(w)) for w in works})


def run_works(works: list[Work]) -> list[list[pb.Prediction]]:
    """The batcher's run_batch: ONE graph execution per model among the works (one, except
    across a hot-swap), each answered by the model it was resolved against."""
    models: dict[int, InferenceModel] = {}
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(works):
        models.setdefault(id(w.model), w.model)
        groups.setdefault(id(w.model), []).append(i)
    out: list = [None] * len(works)
    for key, idx in groups.items():
        results = models[key].run_batch([works[i] for i in idx])
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


class InferenceModel:
    """The request -> predictions path, minus the transport."""

    def __init__(
        self, spec: ModelSpec, pre: Preprocessor, engine: Engine, version: int | None = None
    ):
        self.spec = spec
        self.pre = pre
        self.engine = engine
        self.version = version  # the numbered version dir it came from (None: a plain dir)
        self.names = [t.name for t in spec.tasks]
        self._index = {t.name: i for i, t in enumerate(spec.tasks)}
        self._tasks_response = None

    def label(self, task: str) -> str:
        """The metrics label of a requested task: known names and "*" as-is, else "unknown"."""
        return task if task == ALL_TASKS or task in self._index else "unknown"

    def describe(self) -> str:
        v = "" if self.version is None else f"version {self.version} "
        return f"{v}{self.spec.root} ({len(self.names)} tasks: {','.join(self.names)})"

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

    def prepare(self, kind: str | None, value) -> tuple[np.ndarray, bytes]:
        """The model row and its identity (``input_key``). Runs in the preprocessing pool."""
        row = self.row(kind, value)
        return row, input_key(row)

    def run_batch(self, works: list[Work]) -> list[list[pb.Prediction]]:
        """ONE graph execution for every row of every request -> each request's predictions.
        Each distinct input goes to the graph once; every (input, task) is one row."""
        inputs, slots, input_index, task_ids = [], {}, [], []
        for w in works:
            slot = slots.setdefault(_slot_key(w), len(inputs))
            if slot == len(inputs):
                inputs.append(w.row)
            input_index.extend([slot] * len(w.task_indices))
            task_ids.extend(w.task_indices)
        logits = self.engine.run(inputs, task_ids, input_index)
        out, i = [], 0
        tasks = self.spec.tasks
        for w in works:
            out.append(
                [prediction(tasks[t], logits[i + j], w.top_k) for j, t in enumerate(w.task_indices)]
            )
            i += len(w.task_indices)
        return out

    def list_tasks(self) -> pb.ListTasksResponse:
        if self._tasks_response is None:
            self._tasks_response = pb.ListTasksResponse(
                modality=self.spec.modality,
                tasks=[pb.TaskInfo(name=t.name, classes=list(t.classes)) for t in self.spec.tasks],
            )
        return self._tasks_response


class Frontend:
    """Admission, preprocessing, queueing and metrics of Predict, without any transport.

    `predict(request, deadline)` -> (None, PredictResponse) or (grpc.StatusCode, message).
    """

    def __init__(
        self,
        model: InferenceModel,
        batcher: Batcher,
        pool: ThreadPoolExecutor,
        metrics=None,
        group_by_task: bool = False,
    ):
        self.model = model
        self.batcher = batcher
        self.pool = pool
        self.metrics = metrics
        # a baseline for benchmarks: one task per batch (a `*` becomes one job per task), as a
        # server that switches adapters between batches must run
        self.group_by_task = group_by_task
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        if metrics is not None:
            metrics.in_flight.set_function(lambda: self._active)
            metrics.watch_queue(lambda: self.batcher.waiting, batcher.max_queue)
            metrics.set_model(model.version, str(model.spec.root), model.names)

    def swap(self, model: InferenceModel) -> InferenceModel:
        """Serve `model` from now on; requests already accepted finish on the old one."""
        old, self.model = self.model, model
        if self.metrics is not None:
            self.metrics.set_model(model.version, str(model.spec.root), model.names)
        return old

    async def drain(self, timeout: float | None) -> bool:
        """Refuse new Predicts (UNAVAILABLE) and wait for in-flight ones; False on timeout."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def predict(self, request: pb.PredictRequest, deadline: float | None):
        """(None, response) on success, else (status code, error message)."""
        if self.draining:
            return (
                grpc.StatusCode.UNAVAILABLE,
                "server is draining for shutdown; retry elsewhere",
            )
        model = self.model  # the model this request is resolved against, swap or not
        start = time.perf_counter()
        self._active += 1
        self._idle.clear()
        try:
            code, message = await self._predict(model, request, deadline)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        if self.metrics is not None:
            name = "OK" if code is None else code.name
            self.metrics.observe_request(
                model.label(request.task), name, time.perf_counter() - start
            )
        return code, message

    async def _predict(self, model: InferenceModel, request, deadline):
        try:
            indices, top_k = model.resolve(request.task, request.top_k)
        except TaskNotFound as e:
            return grpc.StatusCode.NOT_FOUND, str(e)
        except InputError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        kind = request.input.WhichOneof("kind")
        value = getattr(request.input, kind) if kind else None
        loop = asyncio.get_running_loop()
        try:
            with self.batcher.expecting():
                row, key = await loop.run_in_executor(self.pool, model.prepare, kind, value)
                length = len(row) if row.ndim == 1 else 0  # text: tokens, padded per batch
                if self.group_by_task:
                    futures = [
                        self.batcher.submit(
                            Work(row, [t], top_k, model, key), 1, deadline, length, group=t
                        )
                        for t in indices
                    ]
                else:
                    work = Work(row, indices, top_k, model, key)
                    futures = [self.batcher.submit(work, len(indices), deadline, length)]
            predictions = [p for f in await asyncio.gather(*futures) for p in f]
        except QueueFull as e:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except InputError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except DeadlineExpired:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before inference"
        except Exception as e:
            return grpc.StatusCode.INTERNAL, f"inference failed: {type(e).__name__}: {e}"
        return None, pb.PredictResponse(predictions=predictions)


class InferenceServicer(pb_grpc.InferenceServicer):
    """deepsurgery.v1.Inference over grpc.aio: the Frontend plus the call's deadline."""

    def __init__(
        self,
        model: InferenceModel,
        batcher: Batcher,
        pool: ThreadPoolExecutor,
        metrics=None,
        group_by_task: bool = False,
    ):
        self.frontend = Frontend(model, batcher, pool, metrics, group_by_task)
        self.batcher = batcher

    @property
    def model(self) -> InferenceModel:
        return self.frontend.model

    @property
    def draining(self) -> bool:
        return self.frontend.draining

    def swap(self, model: InferenceModel) -> InferenceModel:
        return self.frontend.swap(model)

    async def drain(self, timeout: float | None) -> bool:
        return await self.frontend.drain(timeout)

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        code, message = await self.frontend.predict(request, deadline)
        if code is None:
            return message
        await context.abort(code, message)

    async def ListTasks(self, request, context) -> pb.ListTasksResponse:
        return self.frontend.model.list_tasks()
