"""Read and verify an exported model directory (`python -m export.onnx` writes it).

The directory holds `model.onnx`, `manifest.json` and, for text models, `tokenizer.json`. The
manifest is the contract between export and runtime: task names and classes, graph inputs,
the preprocessing to apply, and the sha256 of every file. Nothing here imports onnxruntime, so
a bad directory is reported before any heavy import or allocation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MODALITIES = ("image", "text")


class ModelDirError(ValueError):
    """The model directory is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Task:
    name: str
    index: int  # the row's task_id in the fused graph
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the server needs to know about one model directory."""

    root: Path
    graph: Path  # the ONNX file to load: model.onnx, or one per-task graph
    modality: str  # "image" | "text"
    tasks: tuple[Task, ...]  # the tasks this server answers, in manifest order
    input_names: tuple[str, ...]  # graph inputs, task_ids included when fused
    fused: bool  # True: graph takes task_ids; False: a single-task graph (--task)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def max_classes(self) -> int:
        return max(t.num_classes for t in self.tasks)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ModelDirError(f"{path}: {what}")


def _parse_tasks(raw: Any, mpath: Path) -> tuple[Task, ...]:
    _require(isinstance(raw, list) and raw, mpath, "'tasks' must be a non-empty list")
    tasks = []
    for i, t in enumerate(raw):
        _require(isinstance(t, dict), mpath, f"tasks[{i}] must be an object")
        name, classes = t.get("name"), t.get("classes")
        _require(isinstance(name, str) and name and name != "*", mpath, f"tasks[{i}].name is bad")
        _require(
            isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes),
            mpath,
            f"tasks[{i}].classes must be a non-empty list of strings",
        )
        _require(t.get("index", i) == i, mpath, f"tasks[{i}].index must be {i} (manifest order)")
        n = t.get("num_classes", len(classes))
        _require(n == len(classes), mpath, f"tasks[{i}].num_classes {n} != len(classes)")
        tasks.append(Task(name=name, index=i, classes=tuple(classes)))
    names = [t.name for t in tasks]
    _require(len(set(names)) == len(names), mpath, f"duplicate task names in {names}")
    return tuple(tasks)


def verify_sha256(root: Path, expected: dict[str, str], files: list[str]) -> None:
    """Refuse files whose content differs from the manifest (a stale or half-copied export)."""
    for name in files:
        path = root / name
        _require(path.is_file(), path, "file not found (the manifest lists it); re-run export")
        want = expected.get(name)
        _require(
            isinstance(want, str) and want,
            root / "manifest.json",
            f"no sha256 for {name!r}; re-export so the manifest records it",
        )
        got = sha256_file(path)
        if got != want.lower():
            raise ModelDirError(
                f"{path}: sha256 mismatch (manifest {want[:12]}..., file {got[:12]}...); "
                "the file changed after export: re-run export or restore the file"
            )


def load_model_dir(root: str | Path, task: str | None = None) -> ModelSpec:
    """Parse `root/manifest.json`, check it, verify sha256s and return the spec to serve.

    task=None serves the fused `model.onnx` (every task); task=NAME serves that task's
    single-task graph from the manifest's `per_task` (the naive one-process-per-task setup).
    """
    root = Path(root)
    _require(root.is_dir(), root, "not a directory; pass --model DIR written by export.onnx")
    mpath = root / "manifest.json"
    _require(mpath.is_file(), mpath, "not found; is this a model dir written by export.onnx?")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{mpath}: not valid JSON ({e})") from None
    _require(isinstance(manifest, dict), mpath, "must hold a JSON object")
    version = manifest.get("format_version")
    _require(
        version == FORMAT_VERSION,
        mpath,
        f"format_version {version!r} is not supported (this runtime reads {FORMAT_VERSION})",
    )
    modality = manifest.get("modality")
    _require(modality in MODALITIES, mpath, f"modality {modality!r} must be one of {MODALITIES}")
    tasks = _parse_tasks(manifest.get("tasks"), mpath)

    pre = manifest.get("preprocessing")
    _require(isinstance(pre, dict), mpath, "'preprocessing' must be an object")
    _require(
        pre.get("type") == modality,
        mpath,
        f"preprocessing.type {pre.get('type')!r} != modality {modality!r}",
    )
    inputs = manifest.get("inputs")
    _require(
        isinstance(inputs, list) and all(isinstance(i, dict) and "name" in i for i in inputs),
        mpath,
        "'inputs' must be a list of {name, dtype, shape}",
    )
    input_names = tuple(i["name"] for i in inputs)
    want_inputs = ("pixel_values",) if modality == "image" else ("input_ids", "attention_mask")
    for name in (*want_inputs, "task_ids"):
        _require(name in input_names, mpath, f"inputs lack {name!r} (a {modality} model needs it)")

    sha = manifest.get("sha256") or {}
    _require(isinstance(sha, dict), mpath, "'sha256' must map file names to hex digests")
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
        input_names = tuple(n for n in input_names if n != "task_ids")
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
