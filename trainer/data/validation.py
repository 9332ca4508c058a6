"""The validation split: where merge hyper-parameters are chosen (λ, k), never the test split.

Each task holds out ``validation.size`` rows of its TRAIN split, class-stratified and seeded
by the top-level ``seed`` (and the task's name, so a task's rows do not depend on the other
tasks of the config). The held-out rows are removed from the train split before anything is
fine-tuned on it (experts fine-tuned here and the multitask reference never see them; their
cache keys name the rows they were trained on). A task may name its own validation data
instead (``[[tasks]] validation = "..."``): then nothing is held out.

A task without labelled validation rows (no train split, or an unlabeled validation file) is
scored by agreement with its expert instead of accuracy, on its validation inputs or else on
up to as many of its unlabeled inputs (``surgery.unlabeled``); labels are never read there.
Under the inductive protocol those inputs are carved out of the task's pool
(:func:`carve_unlabeled_validation`), so the bundle row is never chosen on inputs surgery
learned from.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config, TaskConfig
from ..errors import UserError
from .tasks import (
    IMAGE_SUFFIXES,
    Split,
    TaskData,
    check_split_labels,
    read_class_folders,
    read_image,
    read_jsonl,
    resolve_path,
)

DEFAULT_ROWS = 200  # "auto": this many rows per task, at most a fifth of its train split
AUTO_SHARE = 5


def validation_count(size, n: int, task: str) -> int:
    """How many of ``n`` train rows ``size`` holds out ("auto", rows, or a fraction < 1)."""
    if size == "auto":
        return min(DEFAULT_ROWS, n // AUTO_SHARE)
    count = int(round(size * n)) if 0 < size < 1 else int(size)
    if size and count == 0:
        count = 1
    if count >= n:
        raise UserError(
            f"config key 'validation.size' = {size} holds out {count} rows but task '{task}' "
            f"has {n} train rows; use fewer rows, a fraction such as 0.2, or 0 to hold none out"
        )
    return count


def stratified_rows(
    labels: np.ndarray | None, n: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` of ``n`` row indices, sorted: every class in proportion to its share (largest
    remainders; every class keeps a row outside them where the counts allow), random within a
    class. Without labels: a plain random choice."""
    if labels is None:
        return np.sort(rng.choice(n, size=count, replace=False))
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / n
    quota = np.minimum(np.floor(exact).astype(np.int64), np.maximum(sizes - 1, 0))
    room = np.maximum(sizes - 1, 0) - quota
    # the rest, one row each, to the classes with the largest remainders that have room
    for c in np.argsort(-(exact - quota), kind="stable"):
        if quota.sum() >= count:
            break
        if room[c] > 0:
            quota[c] += 1
            room[c] -= 1
    short = count - quota.sum()  # only when singleton classes had to give their row
    for c in np.argsort(-sizes, kind="stable"):
        take = min(short, sizes[c] - quota[c])
        quota[c] += take
        short -= take
    rows = [
        rng.choice(np.flatnonzero(labels == cls), size=q, replace=False)
        for cls, q in zip(classes, quota)
        if q
    ]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def hold_out_validation(config: Config, tasks: list[TaskData], data_root: str | Path) -> None:
    """Give every task its validation split: its own file, or rows held out of its train
    split (removed from it). Call before anything is trained on the train splits."""
    configs: dict[str, TaskConfig] = {t.name: t for t in config.tasks}
    size = config.validation.size
    for task in tasks:
        cfg = configs.get(task.name)
        if cfg is not None and cfg.validation:
            task.validation = read_validation(task, resolve_path(cfg.validation, data_root))
            task.validation_source = "file"
            continue
        if size == 0 or task.train is None:
            continue
        count = validation_count(size, len(task.train), task.name)
        if count == 0:
            continue
        rng = np.random.default_rng([config.seed, zlib.crc32(task.name.encode())])
        held = stratified_rows(task.train.labels, len(task.train), count, rng)
        task.validation = task.train.take(held)
        task.validation_source = "train"
        task.keep_train(np.setdiff1d(np.arange(len(task.train)), held))


def read_validation(task: TaskData, path: Path) -> Split:
    """A task's own validation data: text tasks a jsonl file ({"text"[, "label"]} per line)
    or a text file (one input per line); image tasks an .npz (``x_val``, optional ``y_val``),
    a folder of class folders (the task's class names) or a folder of images (no labels)."""
    where = f"task '{task.name}': validation {path}"
    expected = (
        'a jsonl file ({"text", "label"} per line, labels optional) or a text file'
        if task.modality == "text"
        else "an .npz file with x_val (and y_val), a folder of class folders or of images"
    )
    if not path.exists():
        raise UserError(f"{where} does not exist (expected {expected})")
    if task.modality == "text" and path.is_file() and path.suffix in (".jsonl", ".txt"):
        if path.suffix == ".jsonl":
            split = read_jsonl(path, task.name, labelled=False)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            split = Split([x for x in lines if x.strip()], None)
    elif task.modality == "image" and path.is_file() and path.suffix == ".npz":
        split = _read_npz(path, where)
    elif task.modality == "image" and path.is_dir():
        split = _read_image_folder(path, task, where)
    else:
        raise UserError(f"{where} is not {expected}")
    if len(split) == 0:
        raise UserError(f"{where} holds no rows")
    if task.classes:
        classes = f"the task's {task.num_classes} classes"
        check_split_labels(split, task.num_classes, f"{where}:", classes)
    return split


def _read_npz(path: Path, where: str) -> Split:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_val", "y_val") if k in z}
    except Exception as exc:
        raise UserError(f"{where}: cannot read it: {exc}") from None
    x = arrays.get("x_val")
    if x is None:
        raise UserError(f"{where} lacks the array 'x_val' (uint8 [N, H, W, 3])")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"{where}: x_val must be uint8 [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    y = arrays.get("y_val")
    return Split(x, None if y is None else y.astype(np.int64))


def _read_image_folder(folder: Path, task: TaskData, where: str) -> Split:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        return Split([read_image(f) for f in files], None)
    return read_class_folders(class_dirs, task.classes, where)[0]


@dataclass
class ValidationSet:
    """Per task, the inputs merge hyper-parameters are chosen on, and their labels when every
    task has some (else the criterion is agreement with the experts, for every task)."""

    inputs: list[list]
    labels: list[np.ndarray | None]
    sources: list[str]  # per task: "train" | "file" | "unlabeled"

    @property
    def criterion(self) -> str:
        return "accuracy" if all(y is not None for y in self.labels) else "agreement"

    def rows(self) -> list[int]:
        return [len(x) for x in self.inputs]


def _unlabeled_count(size, n: int) -> int:
    """How many of ``n`` unlabeled inputs score a task without validation rows."""
    if size in (0, "auto"):
        return min(DEFAULT_ROWS, n)
    return min(max(1, int(round(size * n))) if size < 1 else int(size), n)


def _unlabeled_rows(config: Config, task: TaskData, n: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([config.seed, zlib.crc32(task.name.encode()), 1])
    return np.sort(rng.choice(n, size=count, replace=False))


def carve_unlabeled_validation(config: Config, task: TaskData, pool: list) -> list:
    """For a task without validation rows, under the inductive protocol: take the inputs its
    agreement score is computed on out of its unlabeled ``pool`` (as many as
    :func:`validation_set` would use, at most half the pool) and make them its validation
    split (no labels, source "unlabeled"); -> the rest of the pool, what surgery learns from."""
    count = min(_unlabeled_count(config.validation.size, len(pool)), len(pool) // 2)
    if count == 0:
        return pool
    rows = _unlabeled_rows(config, task, len(pool), count)
    task.validation = Split([pool[i] for i in rows], None)
    task.validation_source = "unlabeled"
    keep = np.setdiff1d(np.arange(len(pool)), rows)
    return [pool[i] for i in keep]


def validation_set(
    config: Config, tasks: list[TaskData], unlabeled: list[list] | None
) -> ValidationSet:
    """Every task's validation split, or for a task without one up to as many of its
    unlabeled inputs (a seeded choice; 200 when nothing is held out) as inputs only."""
    inputs, labels, sources = [], [], []
    for t, task in enumerate(tasks):
        if task.validation is not None:
            inputs.append(list(task.validation.inputs))
            labels.append(task.validation.labels)
            sources.append(task.validation_source)
            continue
        if not unlabeled:
            raise ValueError("a task without a validation split needs its unlabeled inputs")
        pool = unlabeled[t]
        rows = _unlabeled_rows(
            config, task, len(pool), _unlabeled_count(config.validation.size, len(pool))
        )
        inputs.append([pool[i] for i in rows])
        labels.append(None)
        sources.append("unlabeled")
    return ValidationSet(inputs, labels, sources)
