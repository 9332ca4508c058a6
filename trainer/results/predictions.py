"""Per-row correctness of a run, kept beside its results.json so two runs can be paired later.

``correct.npz`` holds one bool [N_t] array per (row, task), keyed ``"<method>/<mode>|<task>"``
(the row keys of ``results.json``; a bench analysis keys its own row labels), compressed.
``results.json`` records ``test_rows``: per task the number of scored test rows and a sha256
over each row's input and label in order, so a comparison of two runs is refused unless they
scored the very same rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..data.unlabeled import content_hash

FILE = "correct.npz"
SEPARATOR = "|"


def test_rows_record(tasks, rows: list | None = None) -> dict[str, dict]:
    """-> {task: {"rows": n, "sha256": digest of its (input, label) rows in order}};
    ``rows[t]`` (indices) when task t was scored on a subset of its test rows only."""
    record = {}
    for t, task in enumerate(tasks):
        labels = task.test.labels
        scored = range(len(task.test.inputs)) if rows is None else [int(i) for i in rows[t]]
        digest = hashlib.sha256()
        for i in scored:
            digest.update(content_hash(task.test.inputs[i]))
            digest.update(b"-" if labels is None else str(int(labels[i])).encode())
        record[task.name] = {"rows": len(scored), "sha256": digest.hexdigest()}
    return record


def write_correct(path: Path, correct: Mapping[str, Mapping[str, np.ndarray | None]]) -> None:
    """Write every row's per-task correctness to ``path`` (a temporary name, then renamed)."""
    arrays = {
        f"{row}{SEPARATOR}{task}": np.asarray(values, dtype=bool)
        for row, per_task in correct.items()
        for task, values in per_task.items()
        if values is not None
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)


def read_correct(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``correct.npz`` -> {row: {task: bool [N]}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            row, _, task = key.rpartition(SEPARATOR)
            out.setdefault(row, {})[task] = data[key].astype(bool)
    return out
