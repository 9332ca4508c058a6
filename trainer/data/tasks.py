"""Task data: text ``jsonl`` folders, image ``.npz`` files and class-folder image trees, or
just unlabeled inputs (a text file, a jsonl file without labels, a folder of images).

A task has a test split (evaluation when it is labelled, and the default unlabeled data for
surgery), a train split when it is to be fine-tuned here (a task whose expert is given needs
none), a validation split (rows held out of the train split, or its own file: where merge
hyper-parameters are chosen, see ``data.validation``) and class names (from its files, or else
from its expert). Surgery needs no labels: a task without labelled test rows is merged and
repaired like any other, only not scored. Problems are reported with the path and what was
expected there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    inputs: list | np.ndarray  # texts, or uint8 images [N, H, W, 3] (a list if sizes differ)
    labels: np.ndarray | None  # int64 [N]; None: unlabeled inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index) -> Split:
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index]
        return Split(inputs, None if self.labels is None else self.labels[index])


@dataclass
class TaskData:
    name: str
    classes: list[str]  # [] until the expert names them, when the files do not
    modality: str  # text | image
    train: Split | None  # None: no training rows (the task's expert must be given)
    test: Split
    fingerprint: str  # content hash of the files the task was read from
    validation: Split | None = None  # where merge hyper-parameters are chosen (never test)
    validation_source: str = ""  # "train" (held out of it) | "file" (its own) | "" (none)
    # the file's train rows that ``train`` holds (after train_limit and the validation
    # hold-out); None: every one of them
    train_rows: np.ndarray | None = None

    @property
    def train_key(self) -> str:
        """Content key of the rows a model is trained on: the files' hash, plus which of
        their train rows are used when not all (so no cached model trained on other rows,
        e.g. with the validation rows in, is ever reused)."""
        if self.train_rows is None:
            return self.fingerprint
        rows = np.ascontiguousarray(self.train_rows, dtype=np.int64).tobytes()
        return f"{self.fingerprint}:{hashlib.sha256(rows).hexdigest()[:16]}"

    def keep_train(self, rows: np.ndarray) -> None:
        """Keep only train rows ``rows`` (indices into the current train split)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.train = self.train.take(rows)
        self.train_rows = rows if self.train_rows is None else self.train_rows[rows]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """Does the test split have labels (can the task be scored)?"""
        return self.test.labels is not None


def resolve_path(path: str, data_root: str | Path) -> Path:
    return Path(path.replace("{data}", str(data_root))).expanduser()


def load_task(
    name: str, path: str, data_root: str | Path, train_limit: int = 0, test_limit: int = 0
) -> TaskData:
    """Read one task from a folder or file; limits keep a fixed, class-balanced prefix."""
    where = resolve_path(path, data_root)
    if not where.exists():
        raise UserError(
            f"task '{name}': path {where} does not exist (expected a folder with train.jsonl, "
            "test.jsonl and labels.json, a folder with train/ and test/ class folders of images, "
            "an .npz file with x_train, y_train, x_test, y_test, classes, or unlabeled inputs: "
            "a text file with one input per line, a jsonl file, a folder of images)"
        )
    if where.suffix == ".npz":
        task = _load_npz(name, where)
    elif where.is_file() and where.suffix in (".txt", ".jsonl"):
        task = _load_inputs_file(name, where)
    elif where.is_file():
        raise UserError(
            f"task '{name}': {where} is a file but not an .npz, .jsonl or .txt (one input per "
            "line) file"
        )
    elif any((where / f).is_file() for f in ("labels.json", "train.jsonl", "test.jsonl")):
        task = _load_jsonl(name, where)
    elif (where / "train").is_dir() or (where / "test").is_dir():
        task = _load_image_folders(name, where)
    elif any(f.suffix.lower() in IMAGE_SUFFIXES for f in where.iterdir()):
        task = _load_image_files(name, where)
    else:
        raise UserError(
            f"task '{name}': {where} holds neither train.jsonl + labels.json (text) nor "
            "train/ and test/ class folders (images) nor image files, and is not an .npz file"
        )
    for split_name in ("train", "test"):
        split = getattr(task, split_name)
        if split is not None and len(split) == 0:
            raise UserError(f"task '{name}': the {split_name} split at {where} is empty")
    check_labels(task, str(where))
    if train_limit and task.train is not None and train_limit < len(task.train):
        task.keep_train(_prefix(task.train, train_limit))
    if test_limit:
        task.test = task.test.take(_prefix(task.test, test_limit))
    return task


def check_labels(task: TaskData, where: str) -> None:
    """Every label names one of the task's classes (once the classes are known)."""
    if not task.classes:
        return
    for split_name in ("train", "test"):
        split = getattr(task, split_name)
        if split is not None:
            row = f"task '{task.name}': {split_name}"
            check_split_labels(
                split, task.num_classes, row, f"the {task.num_classes} classes of {where}"
            )


def check_split_labels(split: Split, num_classes: int, where: str, classes: str) -> None:
    """Every label of ``split`` (if labelled) is in 0..num_classes-1, else a ``UserError``
    naming ``where`` the row is and ``classes``, the classes it should be among."""
    if split.labels is None:
        return
    bad = (split.labels < 0) | (split.labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"{where} row {i} has label {int(split.labels[i])}, outside {classes} "
            f"(labels must be 0..{num_classes - 1})"
        )


def _prefix(split: Split, limit: int) -> np.ndarray:
    """The first ``limit`` rows: class-balanced when labelled."""
    if split.labels is None:
        return np.arange(min(limit, len(split)))
    return _balanced_prefix(split.labels, limit)


def _balanced_prefix(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of ``limit`` rows taken round-robin over classes, in file order (deterministic)."""
    if limit >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = []
    depth = 0
    while len(order) < limit:
        for rows in per_class:
            if depth < len(rows):
                order.append(rows[depth])
        depth += 1
    return np.sort(np.asarray(order[:limit]))


def _hash_files(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def read_jsonl(path: Path, name: str, labelled: bool = True) -> Split:
    """``{"text", "label"}`` per line; with ``labelled=False`` the labels may be left out (on
    every line: then the split is unlabeled)."""
    if not path.is_file():
        raise UserError(f'task \'{name}\': {path} is missing (one {{"text", "label"}} per line)')
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                if labelled or "label" in row:
                    labels.append(int(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                what = "'text' and 'label'" if labelled else "'text' (and 'label')"
                raise UserError(
                    f"task '{name}': {path}:{lineno} is not a JSON object with {what}"
                ) from None
    if labels and len(labels) != len(texts):
        raise UserError(
            f"task '{name}': {path} labels some rows but not all; label every row or none"
        )
    return Split(texts, np.asarray(labels, dtype=np.int64) if labels or labelled else None)


def _read_classes(labels_file: Path, name: str) -> list[str]:
    try:
        return [str(c) for c in json.loads(labels_file.read_text())]
    except (json.JSONDecodeError, TypeError):
        raise UserError(f"task '{name}': {labels_file} is not a JSON list of class names") from None


def _load_jsonl(name: str, folder: Path) -> TaskData:
    """train.jsonl (optional: a given expert needs none), test.jsonl, labels.json (optional
    when the expert names its classes)."""
    labels_file, train_file, test_file = (
        folder / "labels.json",
        folder / "train.jsonl",
        folder / "test.jsonl",
    )
    classes = _read_classes(labels_file, name) if labels_file.is_file() else []
    train = read_jsonl(train_file, name) if train_file.is_file() else None
    if train is not None and not classes:
        raise UserError(f"task '{name}': {labels_file} is missing (a JSON list of class names)")
    test = read_jsonl(test_file, name, labelled=False)
    files = [f for f in (labels_file, train_file, test_file) if f.is_file()]
    return TaskData(name, classes, "text", train, test, _hash_files(*files))


def _load_inputs_file(name: str, path: Path) -> TaskData:
    """Inputs only: a text file with one input per line, or a jsonl file (labels optional)."""
    if path.suffix == ".jsonl":
        test = read_jsonl(path, name, labelled=False)
    else:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        test = Split(lines, None)
    return TaskData(name, [], "text", None, test, _hash_files(path))


def _load_npz(name: str, path: Path) -> TaskData:
    """x_test (required), y_test, x_train + y_train and classes (all optional)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {
                k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes") if k in z
            }
    except Exception as exc:
        raise UserError(f"task '{name}': cannot read {path}: {exc}") from None
    if "x_test" not in arrays:
        raise UserError(f"task '{name}': {path} lacks the array 'x_test'")
    if ("x_train" in arrays) != ("y_train" in arrays):
        raise UserError(f"task '{name}': {path} has one of x_train, y_train but not the other")
    for key in ("x_train", "x_test"):
        x = arrays.get(key)
        if x is not None and (x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3):
            raise UserError(
                f"task '{name}': {path}:{key} must be uint8 [N, H, W, 3], got "
                f"{x.dtype} {list(x.shape)}"
            )
    classes = [str(c) for c in arrays.get("classes", [])]
    if "x_train" in arrays and not classes:
        raise UserError(f"task '{name}': {path} has a train split but no 'classes' array")
    train = None
    if "x_train" in arrays:
        train = Split(arrays["x_train"], arrays["y_train"].astype(np.int64))
    y_test = arrays.get("y_test")
    test = Split(arrays["x_test"], None if y_test is None else y_test.astype(np.int64))
    return TaskData(name, classes, "image", train, test, _hash_files(path))


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; a corrupt file is a ``UserError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


def read_class_folders(
    class_dirs: list[Path], classes: list[str], where: str
) -> tuple[Split, list[Path]]:
    """Labelled images from class folders named after ``classes`` (a folder of another name is
    a ``UserError``), with the files read."""
    inputs, labels, files = [], [], []
    for class_dir in class_dirs:
        if class_dir.name not in classes:
            raise UserError(
                f"{where}: class folder {class_dir} is not among the task's classes {classes}"
            )
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                inputs.append(read_image(f))
                labels.append(classes.index(class_dir.name))
                files.append(f)
    return Split(inputs, np.asarray(labels, dtype=np.int64)), files


def _load_image_folders(name: str, folder: Path) -> TaskData:
    """train/<class>/* (optional: a given expert needs none) and test/<class>/*."""
    source = folder / ("train" if (folder / "train").is_dir() else "test")
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"task '{name}': {source} has no class folders")
    files = []
    splits = {}
    for split_name in ("train", "test"):
        root = folder / split_name
        if not root.is_dir():
            if split_name == "train":
                splits["train"] = None
                continue
            raise UserError(f"task '{name}': {root} is missing (class folders of test images)")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
        split, read = read_class_folders(class_dirs, classes, f"task '{name}'")
        splits[split_name] = split
        files += read
    return TaskData(name, classes, "image", splits["train"], splits["test"], _hash_files(*files))


def _load_image_files(name: str, folder: Path) -> TaskData:
    """Unlabeled images: the image files of ``folder`` (sorted by name)."""
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    test = Split([read_image(f) for f in files], None)
    return TaskData(name, [], "image", None, test, _hash_files(*files))
