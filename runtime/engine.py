"""The onnxruntime session: one graph execution for a batch of rows of mixed tasks.

`Engine.run` takes the batch's distinct preprocessed inputs, each output row's task and the
input it reads, and returns the logits of each row, already cut to its task's classes (the
fused graph pads every task to C_max columns). A graph that shares inputs (`input_index`)
gets each distinct input once; older graphs and per-task graphs get one copy per row.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from modeldir import INPUT_INDEX, TASK_IDS
from runtime.manifest import ModelSpec
from runtime.preprocess import Preprocessor

log = logging.getLogger("runtime.engine")

PROVIDER_CHOICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(RuntimeError):
    """The graph cannot be loaded or does not match the manifest."""


def _gpu_visible() -> bool:
    """A cheap look for an NVIDIA device, so CPU-only hosts skip a noisy CUDA EP attempt."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia"))


def choose_providers(mode: str, available: list[str], gpu_visible: bool) -> list[str]:
    """Execution providers to ask onnxruntime for, most preferred first.

    auto: CUDA when this onnxruntime build has the CUDA EP and a GPU is visible, else CPU.
    cuda: CUDA (with CPU for the ops CUDA lacks); an error when the build has no CUDA EP.
    """
    if mode not in PROVIDER_CHOICES:
        raise EngineError(f"--providers {mode!r} must be one of {PROVIDER_CHOICES}")
    if mode == "cpu":
        return [CPU]
    if mode == "cuda":
        if CUDA not in available:
            raise EngineError(
                f"--providers cuda: this onnxruntime has no CUDA EP (has {available}); "
                "install onnxruntime-gpu or use --providers cpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available and gpu_visible else [CPU]


class Engine:
    """Wraps one onnxruntime InferenceSession of a model dir's graph."""

    def __init__(
        self,
        spec: ModelSpec,
        preprocessor: Preprocessor,
        providers: str = "auto",
        intra_op_threads: int = 0,
    ):
        import onnxruntime as ort

        self.spec = spec
        self.pre = preprocessor
        wanted = choose_providers(providers, ort.get_available_providers(), _gpu_visible())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            opts.intra_op_num_threads = intra_op_threads
        # Batches change shape every run, so memory patterns never replay; planning them only
        # grew peak RSS (measured: MiniLM-L6, batch 32 x 128 tokens, 361 -> 321 MiB).
        opts.enable_mem_pattern = False
        # Spinning intra-op threads would steal the cores the gRPC and preprocessing threads need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(spec.graph), opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineError(f"{spec.graph}: onnxruntime cannot load it ({e})") from None
        self.providers = self.session.get_providers()
        if providers == "cuda" and self.providers[0] != CUDA:
            raise EngineError(f"--providers cuda: onnxruntime fell back to {self.providers}")
        log.info(
            "providers: %s (asked %s: %s; onnxruntime offers %s)",
            self.providers,
            providers,
            wanted,
            ort.get_available_providers(),
        )
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(spec.input_names):
            raise EngineError(
                f"{spec.graph}: graph inputs {sorted(graph_inputs)} differ from the manifest's "
                f"{sorted(spec.input_names)}; re-export the model dir"
            )
        self.output_name = self.session.get_outputs()[0].name
        self.shares_inputs = INPUT_INDEX in graph_inputs

    def feeds(
        self,
        inputs: list[np.ndarray],
        task_indices: list[int],
        input_index: list[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """The graph's inputs for R rows: row r is task ``task_indices[r]`` on
        ``inputs[input_index[r]]`` (default: row r reads input r)."""
        if input_index is None:
            input_index = list(range(len(inputs)))
        if self.shares_inputs:
            feeds = self.pre.collate(inputs)
            feeds[INPUT_INDEX] = np.asarray(input_index, dtype=np.int64)
        else:  # one row per input: repeat what rows share
            feeds = self.pre.collate([inputs[i] for i in input_index])
        if self.spec.fused:
            feeds[TASK_IDS] = np.asarray(task_indices, dtype=np.int64)
        return feeds

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph execution -> logits [R, C] float32."""
        return self.session.run([self.output_name], feeds)[0]

    def run(
        self,
        inputs: list[np.ndarray],
        task_indices: list[int],
        input_index: list[int] | None = None,
    ) -> list[np.ndarray]:
        """Rows of mixed tasks over distinct ``inputs`` in ONE session.run -> each row's
        logits, cut to its task."""
        logits = self.run_feeds(self.feeds(inputs, task_indices, input_index))
        rows = len(task_indices)
        if logits.ndim != 2 or logits.shape[0] != rows:
            raise EngineError(f"graph returned logits of shape {logits.shape} for {rows} rows")
        tasks = self.spec.tasks
        return [logits[i, : tasks[t].num_classes] for i, t in enumerate(task_indices)]
