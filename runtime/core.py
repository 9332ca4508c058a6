"""The serving core: requests in, predictions out, on plain Python types (runtime.api).

`Core.infer(request, deadline)` is the whole request path minus any transport: admission (the
queue bound, draining), preprocessing (in a thread pool, small text requests on the loop),
dynamic batching across requests, protocols and tasks (runtime.batcher), one graph execution
per batch (runtime.engine), and the metrics. It returns one list of predictions per input row,
or raises a `runtime.api` ServingError whose `code` the protocol adapters (runtime.protocols)
turn into their status.
Nothing here imports grpc or protobuf; runtime.server and runtime.serve_ray host the same core.

Hot-swap: every `Work` carries the model it was resolved against, and `run_works` runs each
model's works with that model, so a request queued before a swap is answered by the model that
accepted it while new requests go to the new one (`Core.swap`).

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from runtime.api import (
    ALL_TASKS,
    Input,
    Internal,
    InvalidArgument,
    ModelInfo,
    NotFound,
    Prediction,
    Request,
    ServingError,
    TaskInfo,
    Tensor,
    Unavailable,
)
from runtime.batcher import Batcher
from runtime.engine import Engine
from runtime.manifest import ModelSpec
from runtime.postprocess import prediction
from runtime.preprocess import InputError, Preprocessor, decode_tensor


@dataclass
class Work:
    """One input row's share of a batch: the row, the tasks to run it for, top_k, the model
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


def run_works(works: list[Work]) -> list[list[Prediction]]:
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
    """One loaded model dir: its manifest, preprocessing and onnxruntime session."""

    # Text requests of up to this many rows are tokenized on the event loop: a row costs about
    # 0.1-0.3 ms in the Rust tokenizer, less than the thread hop to the preprocessing pool and
    # back (submit, wake-up, the loop's self-pipe), which was the larger share of the Python
    # work per single-row request (py-spy, demo model, 64 clients). Images and tensors, and
    # larger text requests, are preprocessed in the pool so the loop never stalls on them.
    INLINE_TEXT_ROWS = 4

    def __init__(
        self, spec: ModelSpec, pre: Preprocessor, engine: Engine, version: int | None = None
    ):
        self.spec = spec
        self.pre = pre
        self.engine = engine
        self.version = version  # the numbered version dir it came from (None: a plain dir)
        self.names = [t.name for t in spec.tasks]
        self._index = {t.name: i for i, t in enumerate(spec.tasks)}
        row_shape = getattr(pre, "row_shape", None)
        self._info = ModelInfo(
            modality=spec.modality,
            version=version,
            tasks=tuple(TaskInfo(t.name, tuple(t.classes)) for t in spec.tasks),
            row_shape=None if row_shape is None else tuple(row_shape),
        )

    def label(self, task: str) -> str:
        """The metrics label of a requested task: known names and "*" as-is, else "unknown"."""
        return task if task == ALL_TASKS or task in self._index else "unknown"

    def describe(self) -> str:
        v = "" if self.version is None else f"version {self.version} "
        return f"{v}{self.spec.root} ({len(self.names)} tasks: {','.join(self.names)})"

    def info(self, ready: bool = True) -> ModelInfo:
        """What this model offers (built once: metadata RPCs and every v2 request ask)."""
        return self._info if ready else replace(self._info, ready=False)

    def resolve(self, task: str, top_k: int) -> tuple[list[int], int]:
        """Task name or "*" -> task indices; top_k 0 -> 1. Raises NotFound / InputError."""
        if task == ALL_TASKS:
            indices = list(range(len(self.names)))
        elif task in self._index:
            indices = [self._index[task]]
        else:
            shown = repr(task) if task else "an empty task"
            raise NotFound(
                f"unknown task {shown}; this server answers {self.names} or '*' for all of them"
            )
        limit = max(self.spec.tasks[i].num_classes for i in indices)
        if top_k < 0 or top_k > limit:
            raise InputError(
                f"top_k {top_k} is out of range; use 0..{limit} (the classes of "
                f"{task!r}; 0 means 1)"
            )
        return indices, top_k or 1

    def row(self, item: Input | None) -> np.ndarray:
        """One request input -> one model row (in the preprocessing pool, or inline)."""
        kind = None if item is None else item.kind
        if kind == "image":
            return self.pre.image(item.value)
        if kind == "text":
            return self.pre.text(item.value)
        if kind == "tensor" and isinstance(item.value, Tensor):
            t = item.value
            return decode_tensor(self.pre, t.dtype, list(t.shape), t.data)
        raise InputError("request.input is empty; set input.image, input.text or input.tensor")

    def inline(self, inputs: Sequence[Input]) -> bool:
        """Whether to preprocess ``inputs`` on the event loop (small text requests)."""
        return len(inputs) <= self.INLINE_TEXT_ROWS and all(
            item is not None and item.kind == "text" for item in inputs
        )

    def prepare(self, inputs: Sequence[Input]) -> list[tuple[np.ndarray, bytes]]:
        """Each input's model row and identity (``input_key``), in the pool or inline;
        a bad row fails the request, naming the row when there are several."""
        out = []
        for i, item in enumerate(inputs):
            try:
                row = self.row(item)
            except InputError as e:
                if len(inputs) == 1:
                    raise
                raise InputError(f"row {i}: {e}") from None
            out.append((row, input_key(row)))
        return out

    def run_batch(self, works: list[Work]) -> list[list[Prediction]]:
        """ONE graph execution for every row of every request -> each work's predictions.
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


class Core:
    """Admission, preprocessing, batching and metrics of every request, without a transport.

    Owns the batcher and the preprocessing pool: `start()` inside the event loop that will
    call `infer`, `close()` after `drain()`."""

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

    @property
    def healthy(self) -> bool:
        """The batching loop runs: requests can be answered."""
        return self.batcher.running

    def info(self) -> ModelInfo:
        """The served model's tasks and version; `ready` False once draining."""
        return self.model.info(ready=not self.draining and self.healthy)

    def start(self) -> None:
        self.batcher.start()

    def swap(self, model: InferenceModel) -> InferenceModel:
        """Serve `model` from now on; requests already accepted finish on the old one."""
        old, self.model = self.model, model
        if self.metrics is not None:
            self.metrics.set_model(model.version, str(model.spec.root), model.names)
        return old

    async def drain(self, timeout: float | None) -> bool:
        """Refuse new requests (Unavailable) and wait for in-flight ones; False on timeout."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the batcher (queued jobs fail) and the preprocessing threads."""
        await self.batcher.close()
        self.pool.shutdown(wait=True)

    async def infer(self, request: Request, deadline: float | None) -> list[list[Prediction]]:
        """One list of predictions per input (one per task asked, in task order); raises a
        ServingError. `deadline` is a time.monotonic() after which nobody waits (None: none)."""
        if self.draining:
            raise Unavailable("server is draining for shutdown; retry elsewhere")
        model = self.model  # the model this request is resolved against, swap or not
        start = time.perf_counter()
        self._active += 1
        self._idle.clear()
        code = "OK"
        try:
            return await self._infer(model, request, deadline)
        except ServingError as e:
            code = e.code
            raise
        except Exception as e:
            code = Internal.code
            raise Internal(f"inference failed: {type(e).__name__}: {e}") from e
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            self.record(request.task, code, time.perf_counter() - start, request.protocol, model)

    def record(
        self,
        task: str,
        code: str,
        seconds: float,
        protocol: str,
        model: InferenceModel | None = None,
    ) -> None:
        """Count one request in the metrics; an adapter calls it for a request it refused
        before `infer` (a malformed message)."""
        if self.metrics is not None:
            label = (model or self.model).label(task)
            self.metrics.observe_request(label, code, seconds, protocol)

    async def _infer(self, model: InferenceModel, request: Request, deadline):
        indices, top_k = model.resolve(request.task, request.top_k)
        if not request.inputs:
            raise InvalidArgument("the request has no inputs; send at least one row")
        loop = asyncio.get_running_loop()
        with self.batcher.expecting():
            if model.inline(request.inputs):
                prepared = model.prepare(request.inputs)
            else:
                prepared = await loop.run_in_executor(self.pool, model.prepare, request.inputs)
            futures = []
            for row, key in prepared:
                length = len(row) if row.ndim == 1 else 0  # text: tokens, padded per batch
                if self.group_by_task:
                    futures += [
                        self.batcher.submit(
                            Work(row, [t], top_k, model, key), 1, deadline, length, group=t
                        )
                        for t in indices
                    ]
                else:
                    work = Work(row, indices, top_k, model, key)
                    futures.append(self.batcher.submit(work, len(indices), deadline, length))
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        per_input = len(indices) if self.group_by_task else 1
        return [
            [p for r in results[i : i + per_input] for p in r]
            for i in range(0, len(results), per_input)
        ]
