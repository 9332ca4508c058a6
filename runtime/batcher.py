"""Dynamic batching: requests of every task share one queue and one graph execution.

A batch closes when it holds `max_batch` rows, when `max_delay` has passed since its first job
was queued, or as soon as no other job is on its way (none queued, none being preprocessed), so
a lone request never waits for company that is not coming. Jobs are never split: a `*` job of T
rows goes into one batch whole. The oldest job always opens the next batch (no starvation); the
others are picked by how close their length (tokens) is to it, because every row is padded to
the batch's longest: on CPU, padding is compute thrown away. `max_tokens` (rows x longest)
optionally caps a batch's padded size. The work itself (`run_batch`) runs in dedicated
threads, so the event loop keeps accepting and preprocessing requests while the graph executes.
`in_flight` batches may execute at once (default 1: the next batch forms while one runs and
starts when it ends); with 2 the next batch starts while the first still runs, so the cores do
not wait on the Python work between graph runs (onnxruntime sessions take concurrent runs).

`max_queue` bounds the requests waiting (being preprocessed or queued, not yet in a running
batch): `expecting()` raises `QueueFull` beyond it, so overload fails fast instead of growing
latency and memory without limit. `on_batch` (optional) is told each executed batch's rows,
jobs, the queue wait of each job, the execution time and the distinct inputs
(`count_inputs(payloads)`, e.g. a `*` request is one input of T rows; default: one per row),
the metrics hook. A job submitted with a `group` only joins batches of its own group (a
one-task-per-batch baseline); `max_batch` counts rows either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from runtime.api import DeadlineExceeded, ResourceExhausted

log = logging.getLogger("runtime.batcher")


class DeadlineExpired(DeadlineExceeded):
    """The job's deadline passed while it waited in the queue; it was not run."""


class QueueFull(ResourceExhausted):
    """`max_queue` requests are already waiting; this one is refused (RESOURCE_EXHAUSTED)."""


@dataclass
class Job:
    """One request in the queue: `rows` model rows, answered together through `future`."""

    payload: Any  # what run_batch needs (features, task indices, top_k, ...)
    rows: int
    deadline: float | None  # time.monotonic() after which nobody waits for the answer
    future: asyncio.Future
    length: int = 0  # padded dimension of its rows (text: tokens); 0 when rows do not vary
    queued_at: float = field(default_factory=time.monotonic)
    group: Any = None  # None: batches with anything; else only with jobs of the same group


RunBatch = Callable[[list[Any]], list[Any]]  # payloads -> one result per payload
# rows, jobs, each job's queue wait (s), execution time (s), distinct inputs
OnBatch = Callable[[int, int, list[float], float, int], None]
CountInputs = Callable[[list[Any]], int]  # payloads -> distinct inputs the graph receives


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        max_tokens: int = 0,
        max_queue: int = 0,
        on_batch: OnBatch | None = None,
        count_inputs: CountInputs | None = None,
        in_flight: int = 1,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: no limit), got {max_tokens}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0: no limit), got {max_queue}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.max_queue = max_queue
        self.in_flight = in_flight
        self.on_batch = on_batch
        self.count_inputs = count_inputs
        self.max_tokens = max_tokens
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self._queue: deque[Job] = deque()
        self._incoming = 0  # jobs being preprocessed, soon to be submitted
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self.stats = {
            "batches": 0,
            "rows": 0,
            "inputs": 0,
            "jobs": 0,
            "expired": 0,
            "isolated_failures": 0,
            "rejected": 0,
        }

    @property
    def running(self) -> bool:
        """True while the batching loop runs (started and neither closed nor crashed)."""
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet in a running batch (preprocessing or queued)."""
        return self._incoming + len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        """Stop after the current batch; jobs still queued fail (call after draining)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Wrap a job's preprocessing: the open batch waits for it (up to max_delay).

        Raises QueueFull (before any work is done) when `max_queue` requests already wait."""
        if self.max_queue and self.waiting >= self.max_queue:
            self.stats["rejected"] += 1
            raise QueueFull(
                f"queue full: {self.waiting} requests already waiting (--max-queue "
                f"{self.max_queue}); retry with backoff or add replicas"
            )
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wake.set()

    def submit(
        self,
        payload: Any,
        rows: int,
        deadline: float | None = None,
        length: int = 0,
        group: Any = None,
    ) -> asyncio.Future:
        """Queue a job; the returned future gets run_batch's result for it, or its exception."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(Job(payload, rows, deadline, fut, length, group=group))
        self._wake.set()
        return fut

    def _fits(self, rows: int, longest: int) -> bool:
        if rows > self.max_batch:
            return False
        return not self.max_tokens or rows * longest <= self.max_tokens

    def _take_fitting(self, batch: list[Job], rows: int) -> int:
        """Add queued jobs closest in length to the batch's first, while they fit."""
        if not self._queue:
            return rows
        anchor, group = batch[0].length, batch[0].group
        longest = max(j.length for j in batch)
        queue = list(self._queue)
        taken = set()
        for i in sorted(range(len(queue)), key=lambda i: abs(queue[i].length - anchor)):
            job = queue[i]
            if group is not None and job.group != group:
                continue
            if self._fits(rows + job.rows, max(longest, job.length)):
                batch.append(job)
                rows += job.rows
                longest = max(longest, job.length)
                taken.add(i)
                if rows >= self.max_batch:
                    break
        if taken:
            self._queue = deque(j for i, j in enumerate(queue) if i not in taken)
        return rows

    async def _next_batch(self) -> list[Job]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        close_at = first.queued_at + self.max_delay
        while True:
            rows = self._take_fitting(batch, rows)
            if rows >= self.max_batch or self._incoming == 0:
                return batch  # full, or nobody else is coming
            if any(first.group is None or j.group == first.group for j in self._queue):
                return batch  # the next job of this batch's group does not fit
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return batch
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _live(self, batch: list[Job]) -> list[Job]:
        """Drop jobs nobody waits for: cancelled by the client, or past their deadline."""
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.done():  # the RPC was cancelled (deadline or client gone)
                self.stats["expired"] += 1
            elif job.deadline is not None and now >= job.deadline:
                self.stats["expired"] += 1
                job.future.set_exception(DeadlineExpired("deadline passed before inference"))
            else:
                live.append(job)
        return live

    def _run_isolated(self, payloads: list[Any]) -> list[tuple[bool, Any]]:
        """Run the batch; if it fails, run each job alone so one bad job fails only itself."""
        try:
            return [(True, r) for r in self.run_batch(payloads)]
        except Exception:
            if len(payloads) == 1:
                raise
        out = []
        for p in payloads:
            try:
                out.append((True, self.run_batch([p])[0]))
            except Exception as e:
                self.stats["isolated_failures"] += 1
                out.append((False, e))
        return out

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.in_flight)
        running: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            slots.release()

        try:
            while True:
                await slots.acquire()
                try:
                    batch = self._live(await self._next_batch())
                except BaseException:
                    slots.release()
                    raise
                if not batch:
                    slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                running.add(task)
                task.add_done_callback(finished)
        finally:  # close(): the running batches' jobs get their shutdown error
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _execute(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_isolated, [j.payload for j in batch]
            )
        except asyncio.CancelledError:  # close() during a run: nobody will answer these
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("server shutting down"))
            raise
        except Exception as e:
            log.exception("batch of %d jobs failed", len(batch))
            results = [(False, e)] * len(batch)
        self.stats["batches"] += 1
        self.stats["jobs"] += len(batch)
        rows = sum(j.rows for j in batch)
        self.stats["rows"] += rows
        inputs = rows
        if self.count_inputs is not None:
            try:
                inputs = self.count_inputs([j.payload for j in batch])
            except Exception:  # statistics must never fail the requests
                log.exception("count_inputs failed")
        self.stats["inputs"] += inputs
        if self.on_batch is not None:
            try:
                waits = [started - j.queued_at for j in batch]
                self.on_batch(rows, len(batch), waits, time.monotonic() - started, inputs)
            except Exception:  # a metrics hook must never fail the requests
                log.exception("on_batch hook failed")
        for job, (ok, value) in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
