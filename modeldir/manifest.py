"""The manifest schema shared by the trainer's bundle and the exporter's model dir.

Both directories hold a ``manifest.json`` with the same core fields, written and read only
through this module:

- ``format_version``: ``FORMAT_VERSION``; a reader refuses any other value.
- ``modality``: one of ``MODALITIES``.
- ``tasks``: ``[{"name", "index", "classes", "num_classes"}, ...]`` in task-id order
  (``index`` is the row's task id, ``num_classes == len(classes)``), built by ``task_entries``
  and parsed by ``parse_tasks``.
- ``preprocessing``: an object whose ``type`` equals the modality.
- ``sha256``: file name (relative to the directory) -> hex sha256 of its bytes, checked by
  ``verify_files``.

The model dir's graph (export -> runtime) adds ``inputs`` (``graph_inputs``: N distinct
inputs once, then per output row ``input_index`` and ``task_ids``; model dirs from before
the shared prefix lack ``input_index`` and still load), ``precision`` (one of ``PRECISIONS``)
and ``parity`` against PyTorch, held to ``PARITY_BARS``.

Each problem raises ``ManifestError`` with a one-line message naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .files import sha256_file

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
MANIFEST = "manifest.json"
ALL_TASKS = "*"  # reserved: a request for every task, so no task may be named this

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


class ManifestError(ValueError):
    """A manifest (or a file it lists) is missing, malformed or does not match."""


@dataclass(frozen=True)
class Task:
    """One task of a manifest: its name, its task id in the graph and its class labels."""

    name: str
    index: int  # the row's task id in the fused graph
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _require(cond: Any, path: str | Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- tasks


def parse_tasks(raw: Any, path: str | Path) -> tuple[Task, ...]:
    """The manifest's ``tasks`` list -> Tasks, checked; ``path`` names the file in errors."""
    _require(isinstance(raw, list) and raw, path, "'tasks' must be a non-empty list")
    tasks = []
    for i, entry in enumerate(raw):
        _require(isinstance(entry, dict), path, f"tasks[{i}] must be an object")
        name, classes = entry.get("name"), entry.get("classes")
        _require(
            isinstance(name, str) and name and name != ALL_TASKS,
            path,
            f"tasks[{i}].name must be a non-empty string other than {ALL_TASKS!r}, got {name!r}",
        )
        _require(
            isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes),
            path,
            f"tasks[{i}].classes must be a non-empty list of strings",
        )
        index = entry.get("index", i)
        _require(
            _is_int(index) and index == i,
            path,
            f"tasks[{i}].index is {index!r}; it must be {i} (the manifest order)",
        )
        n = entry.get("num_classes", len(classes))
        _require(
            _is_int(n) and n == len(classes),
            path,
            f"tasks[{i}].num_classes {n!r} != len(tasks[{i}].classes) {len(classes)}",
        )
        tasks.append(Task(name=name, index=i, classes=tuple(classes)))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    _require(not duplicates, path, f"duplicate task names {duplicates} in 'tasks'")
    return tuple(tasks)


def task_entries(names: Sequence[str], classes: Sequence[Sequence[str]]) -> list[dict]:
    """The manifest's ``tasks`` list for tasks ``names`` (task ids 0..T-1) with ``classes``.

    The entries are parsed back before they are returned, so a writer cannot produce a list
    that a reader refuses.
    """
    if len(names) != len(classes):
        raise ManifestError(f"task_entries: {len(names)} task names but {len(classes)} class lists")
    entries = [
        {"name": name, "index": i, "classes": list(labels), "num_classes": len(labels)}
        for i, (name, labels) in enumerate(zip(names, classes, strict=True))
    ]
    parse_tasks(entries, "task entries")
    return entries


# ---------------------------------------------------------------- files


def _check_file_name(name: Any, path: str | Path, field: str) -> None:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    _require(
        isinstance(name, str)
        and name
        and "\\" not in name
        and not PurePosixPath(name).is_absolute()
        and ".." not in parts,
        path,
        f"{field}: {name!r} is not a file name inside the directory",
    )


def check_sha256_map(raw: Any, path: str | Path) -> dict[str, str]:
    """The manifest's ``sha256`` object: relative file name -> 64 hex digits."""
    _require(
        isinstance(raw, dict), path, "'sha256' must be an object mapping file names to digests"
    )
    for name, digest in raw.items():
        _check_file_name(name, path, "sha256")
        _require(
            isinstance(digest, str) and _HEX_DIGEST.fullmatch(digest),
            path,
            f"sha256[{name!r}] must be 64 hex digits, got {digest!r}",
        )
    return raw


def verify_files(
    root: str | Path,
    sha256_map: Mapping[str, str],
    names: Iterable[str],
    *,
    hint: str = "re-create the directory",
) -> None:
    """Refuse a listed file that is missing, has no recorded digest, or whose bytes differ
    (a stale, half-copied or modified directory). ``hint`` says what to do about it."""
    root = Path(root)
    for name in names:
        _check_file_name(name, root / MANIFEST, "file")
        path = root / name
        _require(path.is_file(), path, f"file not found (the manifest lists it); {hint}")
        want = sha256_map.get(name)
        _require(
            isinstance(want, str) and want,
            root / MANIFEST,
            f"no sha256 for {name!r}; {hint} so the manifest records it",
        )
        got = sha256_file(path)
        _require(
            got == want.lower(),
            path,
            f"sha256 mismatch (manifest {want[:12]}..., file {got[:12]}...); the file changed "
            f"after it was written: {hint} or restore the file",
        )


# ---------------------------------------------------------------- the manifest


def check_manifest(manifest: Any, path: str | Path) -> tuple[Task, ...]:
    """Check the fields every manifest has; returns its tasks."""
    _require(isinstance(manifest, dict), path, "must hold a JSON object")
    version = manifest.get("format_version")
    _require(
        _is_int(version) and version == FORMAT_VERSION,
        path,
        f"format_version {version!r} is not supported (this version reads {FORMAT_VERSION})",
    )
    modality = manifest.get("modality")
    _require(modality in MODALITIES, path, f"modality {modality!r} must be one of {MODALITIES}")
    tasks = parse_tasks(manifest.get("tasks"), path)
    pre = manifest.get("preprocessing")
    _require(isinstance(pre, dict), path, "'preprocessing' must be an object")
    _require(
        pre.get("type") == modality,
        path,
        f"preprocessing.type {pre.get('type')!r} != modality {modality!r}",
    )
    check_sha256_map(manifest.get("sha256"), path)
    return tasks


def read_manifest(directory: str | Path, *, what: str = "model dir", hint: str = "") -> dict:
    """Load ``directory/manifest.json`` and check its common fields (``check_manifest``).

    ``what`` names the kind of directory in errors ("bundle", "model dir"); ``hint`` says how
    to get a good one. The listed files are not read here: see ``verify_files``.
    """
    directory = Path(directory)
    tail = f"; {hint}" if hint else ""
    _require(directory.is_dir(), directory, f"{what} does not exist (not a directory){tail}")
    path = directory / MANIFEST
    _require(path.is_file(), path, f"not found, so {directory} is not a complete {what}{tail}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    check_manifest(manifest, path)
    return manifest


# ---------------------------------------------------------------- the model dir's graph

TASK_IDS = "task_ids"  # [R] int64: the task of each output row
INPUT_INDEX = "input_index"  # [R] int64: the distinct input each output row reads
PRECISIONS = ("fp32", "fp16", "int8")
# The export's parity bars against PyTorch, per precision (the exporter refuses to write a
# graph below its bar; the runtime refuses a model dir whose record says it is below).
PARITY_BARS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_logit_diff": 1e-4, "top1_agreement": 1.0},
    "fp16": {"top1_agreement": 0.995},
    # int8 moves logits by quantisation noise, so near-ties may flip: the bar is top-1 only
    "int8": {"top1_agreement": 0.95},
}


def backbone_input_names(modality: str) -> tuple[str, ...]:
    """The graph inputs that carry the (distinct) inputs of a ``modality`` model."""
    return ("pixel_values",) if modality == "image" else ("input_ids", "attention_mask")


def graph_inputs(
    modality: str, image_size: Sequence[int] = (224, 224), shared: bool = True
) -> list[dict]:
    """The model dir's ``inputs`` list (name, dtype, symbolic shape), in graph order.

    ``shared`` (what export writes): the graph takes N distinct ``inputs`` once, then per
    output row ``input_index`` [R] (which input) and ``task_ids`` [R] (which task), so the
    backbone before the first task-specific operation runs once per distinct input. Without
    it (model dirs written before): one row per input, ``task_ids`` [batch].
    """
    batch = "inputs" if shared else "batch"
    if modality == "image":
        specs = [{"name": "pixel_values", "dtype": "float32", "shape": [batch, 3, *image_size]}]
    else:
        specs = [
            {"name": n, "dtype": "int64", "shape": [batch, "sequence"]}
            for n in backbone_input_names(modality)
        ]
    rows = "rows" if shared else "batch"
    if shared:
        specs.append({"name": INPUT_INDEX, "dtype": "int64", "shape": [rows]})
    return [*specs, {"name": TASK_IDS, "dtype": "int64", "shape": [rows]}]


def parity_failure(parity: Any, precision: str) -> str | None:
    """Why a model dir's recorded ``parity`` fails its precision's bar, else None (also None
    without a record: hand-made or older model dirs are checked by running them)."""
    if not isinstance(parity, dict) or "top1_agreement" not in parity:
        return None
    bar = PARITY_BARS.get(precision)
    if bar is None:
        return f"precision {precision!r} is not one of {PRECISIONS}"
    diff, top1 = parity.get("max_abs_logit_diff"), parity.get("top1_agreement")
    if not isinstance(top1, int | float) or not 0.0 <= top1 <= 1.0:
        return f"parity.top1_agreement {top1!r} is not a fraction"
    if diff is not None and (not isinstance(diff, int | float) or not math.isfinite(diff)):
        return f"parity.max_abs_logit_diff {diff!r} is not a finite number"
    if "max_abs_logit_diff" in bar and (diff is None or diff > bar["max_abs_logit_diff"]):
        return (
            f"parity record fails the {precision} bar (max |dlogit| {diff!r} > "
            f"{bar['max_abs_logit_diff']:g})"
        )
    if top1 < bar["top1_agreement"]:
        return (
            f"parity record fails the {precision} bar (top-1 {top1:.2%} < "
            f"{bar['top1_agreement']:.1%})"
        )
    return None
