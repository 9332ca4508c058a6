"""Task data: text ``jsonl`` folders, image ``.npz`` files and class-folder image trees.

Every task has a train split (for fine-tuning experts), a test split (evaluation, and the
default unlabeled data for surgery) and class names. Problems are reported with the path and
what was expected there.
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
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> Split:
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index]
        return Split(inputs, self.labels[index])


@dataclass
class TaskData:
    name: str
    classes: list[str]
    modality: str  # text | image
    train: Split
    test: Split
    fingerprint: str  # content hash of the files the task was read from

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
            "or an .npz file with x_train, y_train, x_test, y_test, classes)"
        )
    if where.suffix == ".npz":
        task = _load_npz(name, where)
    elif (where / "labels.json").is_file() or (where / "train.jsonl").is_file():
        task = _load_jsonl(name, where)
    elif (where / "train").is_dir():
        task = _load_image_folders(name, where)
    else:
        raise UserError(
            f"task '{name}': {where} holds neither train.jsonl + labels.json (text) nor "
            "train/ and test/ class folders (images), and is not an .npz file"
        )
    for split_name in ("train", "test"):
        split = getattr(task, split_name)
        if len(split) == 0:
            raise UserError(f"task '{name}': the {split_name} split at {where} is empty")
        bad = (split.labels < 0) | (split.labels >= task.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(
                f"task '{name}': {split_name} row {i} has label {int(split.labels[i])}, outside "
                f"the {task.num_classes} classes of {where} "
                f"(labels must be 0..{task.num_classes - 1})"
            )
    if train_limit:
        task.train = task.train.take(_balanced_prefix(task.train.labels, train_limit))
    if test_limit:
        task.test = task.test.take(_balanced_prefix(task.test.labels, test_limit))
    return task


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


def _read_jsonl(path: Path, name: str) -> Split:
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
                labels.append(int(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(
                    f"task '{name}': {path}:{lineno} is not a JSON object with 'text' and 'label'"
                ) from None
    return Split(texts, np.asarray(labels, dtype=np.int64))


def _load_jsonl(name: str, folder: Path) -> TaskData:
    labels_file = folder / "labels.json"
    if not labels_file.is_file():
        raise UserError(f"task '{name}': {labels_file} is missing (a JSON list of class names)")
    try:
        classes = [str(c) for c in json.loads(labels_file.read_text())]
    except (json.JSONDecodeError, TypeError):
        raise UserError(f"task '{name}': {labels_file} is not a JSON list of class names") from None
    train = _read_jsonl(folder / "train.jsonl", name)
    test = _read_jsonl(folder / "test.jsonl", name)
    fp = _hash_files(labels_file, folder / "train.jsonl", folder / "test.jsonl")
    return TaskData(name, classes, "text", train, test, fp)


def _load_npz(name: str, path: Path) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
    except KeyError as exc:
        raise UserError(f"task '{name}': {path} lacks the array {exc}") from None
    except Exception as exc:
        raise UserError(f"task '{name}': cannot read {path}: {exc}") from None
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(
                f"task '{name}': {path}:{key} must be uint8 [N, H, W, 3], got "
                f"{x.dtype} {list(x.shape)}"
            )
    classes = [str(c) for c in arrays["classes"]]
    train = Split(arrays["x_train"], arrays["y_train"].astype(np.int64))
    test = Split(arrays["x_test"], arrays["y_test"].astype(np.int64))
    return TaskData(name, classes, "image", train, test, _hash_files(path))


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; a corrupt file is a ``UserError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


def _load_image_folders(name: str, folder: Path) -> TaskData:
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"task '{name}': {folder / 'train'} has no class folders")
    files = []
    splits = {}
    for split_name in ("train", "test"):
        root = folder / split_name
        if not root.is_dir():
            raise UserError(f"task '{name}': {root} is missing (class folders of test images)")
        inputs, labels = [], []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise UserError(
                    f"task '{name}': class folder {class_dir} is not among the "
                    f"train classes {classes}"
                )
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    inputs.append(read_image(f))
                    labels.append(classes.index(class_dir.name))
                    files.append(f)
        splits[split_name] = Split(inputs, np.asarray(labels, dtype=np.int64))
    return TaskData(name, classes, "image", splits["train"], splits["test"], _hash_files(*files))
