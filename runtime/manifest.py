"""Read and verify an exported model directory (`python -m export.onnx` writes it).

The directory holds `model.onnx`, `manifest.json` and, for text models, `tokenizer.json`. The
manifest is the contract between export and runtime: its common fields (format version,
modality, tasks, preprocessing type, sha256 of every file) are the `modeldir` schema the
exporter writes with; this module adds the runtime's own checks (graph inputs, per-task graphs,
preprocessing details). Nothing here imports onnxruntime, so a bad directory is reported before
any heavy import or allocation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldir import (
    FORMAT_VERSION,
    INPUT_INDEX,
    MANIFEST,
    MODALITIES,
    TASK_IDS,
    ManifestError,
    Task,
    backbone_input_names,
    parse_tasks,
    read_manifest,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION",
    "MODALITIES",
    "ModelDirError",
    "ModelSpec",
    "Task",
    "load_model_dir",
    "verify_sha256",
]


class ModelDirError(ManifestError):
    """The model directory is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the server needs to know about one model directory."""

    root: Path
    graph: Path  # the ONNX file to load: model.onnx, or one per-task graph
    modality: str  # "image" | "text"
    tasks: tuple[Task, ...]  # the tasks this server answers, in manifest order
    input_names: tuple[str, ...]  # graph inputs, input_index and task_ids included when fused
    fused: bool  # True: graph takes task_ids; False: a single-task graph (--task)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def shares_inputs(self) -> bool:
        """The graph takes distinct inputs once plus per row ``input_index``: rows of one
        input share the backbone up to the first task-specific operation. False for model
        dirs exported before (one row per input) and for per-task graphs."""
        return INPUT_INDEX in self.input_names

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def max_classes(self) -> int:
        return max(t.num_classes for t in self.tasks)


@contextlib.contextmanager
def _model_dir_errors() -> Iterator[None]:
    """The shared schema's ManifestError, raised as this module's ModelDirError."""
    try:
        yield
    except ModelDirError:
        raise
    except ManifestError as e:
        raise ModelDirError(str(e)) from None


def _require(cond: Any, path: Path, what: str) -> None:
    if not cond:
        raise ModelDirError(f"{path}: {what}")


def verify_sha256(root: Path, expected: dict[str, str], files: list[str]) -> None:
    """Refuse files whose content differs from the manifest (a stale or half-copied export)."""
    with _model_dir_errors():
        verify_files(root, expected, files, hint="re-run export")


def load_model_dir(root: str | Path, task: str | None = None) -> ModelSpec:
    """Parse `root/manifest.json`, check it, verify sha256s and return the spec to serve.

    task=None serves the fused `model.onnx` (every task); task=NAME serves that task's
    single-task graph from the manifest's `per_task` (the naive one-process-per-task setup).
    """
    root = Path(root)
    mpath = root / MANIFEST
    with _model_dir_errors():
        manifest = read_manifest(
            root, what="model dir", hint="pass --model DIR written by python -m export.onnx"
        )
        tasks = parse_tasks(manifest["tasks"], mpath)
    modality, pre, sha = manifest["modality"], manifest["preprocessing"], manifest["sha256"]
    inputs = manifest.get("inputs")
    _require(
        isinstance(inputs, list) and all(isinstance(i, dict) and "name" in i for i in inputs),
        mpath,
        "'inputs' must be a list of {name, dtype, shape}",
    )
    input_names = tuple(i["name"] for i in inputs)
    for name in (*backbone_input_names(modality), TASK_IDS):
        _require(name in input_names, mpath, f"inputs lack {name!r} (a {modality} model needs it)")

    files = []
    if task is None:
        graph, fused, served = "model.onnx", True, tasks
    else:
        per_task = manifest.get("per_task") or {}
        names = [t.name for t in tasks]
        _require(
            task in names, mpath, f"--task {task!r} is not a task of this model; one of {names}"
        )
        _require(
            task in per_task,
            mpath,
            f"no per-task graph for {task!r}; export with --per-task to serve one task alone",
        )
        graph, fused = per_task[task], False
        served = (Task(name=task, index=0, classes=tasks[names.index(task)].classes),)
        input_names = tuple(n for n in input_names if n not in (TASK_IDS, INPUT_INDEX))
    files.append(graph)
    if modality == "text":
        tok = pre.get("tokenizer", "tokenizer.json")
        _require(isinstance(tok, str) and tok, mpath, "preprocessing.tokenizer must be a file name")
        _require(
            isinstance(pre.get("max_length"), int) and pre["max_length"] > 0,
            mpath,
            "preprocessing.max_length must be a positive integer",
        )
        files.append(tok)
    else:
        size = pre.get("image_size")
        _require(
            isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size),
            mpath,
            "preprocessing.image_size must be [height, width]",
        )
        for key in ("mean", "std"):
            v = pre.get(key)
            _require(
                isinstance(v, list) and len(v) == 3, mpath, f"preprocessing.{key} needs 3 values"
            )
        _require(all(s > 0 for s in pre["std"]), mpath, "preprocessing.std must be positive")
    # Files without a recorded digest (e.g. tokenizer.json from an older export) are only
    # verified when the manifest lists them; the graph itself must always be listed.
    verify_sha256(root, sha, [f for f in files if f == graph or f in sha])
    return ModelSpec(
        root=root,
        graph=root / graph,
        modality=modality,
        tasks=served,
        input_names=input_names,
        fused=fused,
        preprocessing=pre,
        manifest=manifest,
    )
