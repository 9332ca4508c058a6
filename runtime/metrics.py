"""Prometheus metrics of one server process (`--metrics-port`), in prometheus_client's format.

Every metric lives in the server's own `CollectorRegistry` (several servers in one test process
do not collide) together with the standard process collector (RSS, CPU, open fds). Names:

- deepsurgery_requests_total{task,code,protocol}: requests by task ("*", a task, or "unknown"
  for names this model does not have, so clients cannot blow up the label set), gRPC status
  and protocol (deepsurgery.v1, open-inference; a ModelInfer of N rows is one request)
- deepsurgery_request_latency_seconds{task}: request latency as the server sees it
- deepsurgery_queue_wait_seconds: time a job waited in the queue before its batch ran
- deepsurgery_batch_rows: rows per graph execution (histogram)
- deepsurgery_batch_inputs: distinct inputs per graph execution (histogram): a `*` request is
  one input of T rows, identical inputs within a batch are one; the backbone's shared part
  runs once per input
- deepsurgery_inference_count_total / deepsurgery_execution_count_total: rows run / graph
  executions, and deepsurgery_average_batch_size = their ratio (Triton's definition);
  deepsurgery_input_count_total and deepsurgery_average_inputs_per_execution likewise for
  distinct inputs
- deepsurgery_queue_depth: requests waiting (preprocessing or queued); deepsurgery_queue_limit
- deepsurgery_in_flight_requests: requests being answered
- deepsurgery_model_version: the served version number (0: a plain model dir), with
  deepsurgery_model_info{version,path,tasks} = 1, and deepsurgery_model_reloads_total{result}
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "deepsurgery_requests",
            "Requests by task, gRPC status and protocol",
            ["task", "code", "protocol"],
            registry=r,
        )
        self.latency = Histogram(
            "deepsurgery_request_latency_seconds",
            "Request latency (arrival to answer)",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "deepsurgery_queue_wait_seconds",
            "Time a request waited in the queue before its batch ran",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "deepsurgery_batch_rows", "Rows per graph execution", buckets=ROW_BUCKETS, registry=r
        )
        self.batch_inputs = Histogram(
            "deepsurgery_batch_inputs",
            "Distinct inputs per graph execution (rows of one input share its pass)",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.inferences = Counter(
            "deepsurgery_inference_count", "Rows run through the graph", registry=r
        )
        self.input_count = Counter(
            "deepsurgery_input_count", "Distinct inputs run through the graph", registry=r
        )
        self.executions = Counter(
            "deepsurgery_execution_count", "Graph executions (batches)", registry=r
        )
        self.execution_time = Counter(
            "deepsurgery_execution_seconds", "Time spent in graph executions", registry=r
        )
        avg = Gauge(
            "deepsurgery_average_batch_size",
            "Rows per graph execution since start (inference count / execution count)",
            registry=r,
        )
        avg.set_function(self._average_batch)
        avg_inputs = Gauge(
            "deepsurgery_average_inputs_per_execution",
            "Distinct inputs per graph execution since start (input count / execution count)",
            registry=r,
        )
        avg_inputs.set_function(self._average_inputs)
        self.queue_depth = Gauge(
            "deepsurgery_queue_depth", "Requests waiting (preprocessing or queued)", registry=r
        )
        self.queue_limit = Gauge(
            "deepsurgery_queue_limit", "--max-queue (0: unbounded)", registry=r
        )
        self.in_flight = Gauge(
            "deepsurgery_in_flight_requests", "Requests being answered", registry=r
        )
        self.model_version = Gauge(
            "deepsurgery_model_version", "Served model version (0: a plain model dir)", registry=r
        )
        self.model_info = Gauge(
            "deepsurgery_model_info",
            "The served model (value 1)",
            ["version", "path", "tasks"],
            registry=r,
        )
        self.reloads = Counter(
            "deepsurgery_model_reloads",
            "Model reload attempts by result (loaded, refused)",
            ["result"],
            registry=r,
        )
        self._http = None
        self._lock = threading.Lock()
        self._rows = 0
        self._inputs = 0
        self._batches = 0

    def _average_batch(self) -> float:
        with self._lock:
            return self._rows / self._batches if self._batches else 0.0

    def _average_inputs(self) -> float:
        with self._lock:
            return self._inputs / self._batches if self._batches else 0.0

    def watch_queue(self, depth: Callable[[], float], limit: int) -> None:
        self.queue_depth.set_function(depth)
        self.queue_limit.set(limit)

    def on_batch(
        self, rows: int, jobs: int, waits: list[float], seconds: float, inputs: int | None = None
    ) -> None:
        """Batcher hook: one graph execution of `rows` rows over `inputs` distinct inputs
        (default: one per row) for `jobs` requests."""
        inputs = rows if inputs is None else inputs
        with self._lock:
            self._rows += rows
            self._inputs += inputs
            self._batches += 1
        self.inferences.inc(rows)
        self.input_count.inc(inputs)
        self.batch_inputs.observe(inputs)
        self.executions.inc()
        self.execution_time.inc(seconds)
        self.batch_rows.observe(rows)
        for w in waits:
            self.queue_wait.observe(max(0.0, w))

    def observe_request(
        self, task: str, code: str, seconds: float, protocol: str = "deepsurgery.v1"
    ) -> None:
        self.requests.labels(task=task, code=code, protocol=protocol).inc()
        self.latency.labels(task=task).observe(seconds)

    def set_model(self, version: int | None, path: str, tasks: list[str]) -> None:
        self.model_version.set(version or 0)
        self.model_info.clear()
        self.model_info.labels(version=str(version or 0), path=path, tasks=",".join(tasks)).set(1)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint (a daemon thread); the bound port (0: any free).

        Raises ValueError with a one-line reason when the address cannot be bound."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror or e
            raise ValueError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({why}); "
                "pick another --metrics-port"
            ) from None
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
