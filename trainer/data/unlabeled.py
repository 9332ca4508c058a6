"""Unlabeled inputs: what surgery and data-driven merging learn from (never labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import UserError
from .tasks import IMAGE_SUFFIXES, TaskData, read_image, resolve_path


def unlabeled_inputs(config: Config, tasks: list[TaskData], data_root: Path) -> list[list]:
    """Per task, the unlabeled inputs surgery and AdaMerging learn from (never labels).

    ``surgery.unlabeled``: ``test`` (each task's own test inputs, the paper's default),
    ``task:<name>`` (another task's test inputs for every task: "wild" data), or a path to
    wild inputs (a text/jsonl file or task folder, an .npz, or a folder of images).
    ``surgery.unlabeled_fraction`` keeps a seeded random fraction.
    """
    source = config.surgery.unlabeled
    if source == "test":
        pools = [list(t.test.inputs) for t in tasks]
    elif source.startswith("task:"):
        name = source[5:]
        match = [t for t in tasks if t.name == name]
        if not match:
            raise UserError(
                f"surgery.unlabeled '{source}': no task named '{name}'; tasks: "
                f"{', '.join(t.name for t in tasks)}"
            )
        pools = [list(match[0].test.inputs)] * len(tasks)
    else:
        wild = read_wild(resolve_path(source, data_root))
        pools = [wild] * len(tasks)
    fraction = config.surgery.unlabeled_fraction
    rng = np.random.default_rng(config.surgery.seed)
    out = []
    for pool in pools:
        keep = max(1, int(round(len(pool) * fraction)))
        rows = (
            np.sort(rng.choice(len(pool), size=keep, replace=False))
            if keep < len(pool)
            else np.arange(len(pool))
        )
        out.append([pool[i] for i in rows])
    return out


def read_wild(path: Path) -> list:
    """Unlabeled inputs from a file or folder; labels, if the file has any, are ignored."""
    if not path.exists():
        raise UserError(
            f"surgery.unlabeled: {path} does not exist (expected 'test', "
            "'task:<name>', a text/jsonl file, an .npz, or a folder of inputs)"
        )
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            key = "x_test" if "x_test" in z else "x_train"
            items = list(z[key])
    elif path.is_file():
        items = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                items.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line)
    elif (path / "test.jsonl").is_file():
        items = [
            json.loads(x)["text"]
            for x in (path / "test.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
    else:
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        items = [read_image(f) for f in files]
    if not items:
        raise UserError(f"surgery.unlabeled: {path} holds no inputs (texts or images)")
    return items
