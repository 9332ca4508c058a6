"""Text tasks whose train and test inputs differ (the shared ``text_tasks`` fixture repeats
six sentences per task across its splits, which leaves the inductive pool empty)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.conftest import write_text_task

ANIMALS = [["cat", "dog", "horse"], ["car", "bus", "train"]]
COLOURS = [["red", "blue"], ["happy", "sad"], ["table", "chair"]]


def distinct_rows(words: list[list[str]], n: int, seed: int, start: int) -> list[tuple[str, int]]:
    """``n`` sentences, each unique (numbered from ``start``), labelled by their keyword."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(len(words)))
        word = words[label][rng.integers(len(words[label]))]
        rows.append((f"the {word} number {start + i}", label))
    return rows


def write_distinct_tasks(root: Path, copies: int = 0) -> Path:
    """Two text tasks, animals and colours, whose train and test sentences differ, but for
    ``copies`` test rows of animals repeated in its train split (as real datasets do)."""
    test = distinct_rows(ANIMALS, 24, 1, 1000)
    write_text_task(
        root / "animals",
        ["animal", "vehicle"],
        distinct_rows(ANIMALS, 48, 0, 0) + test[:copies],
        test,
    )
    write_text_task(
        root / "colours",
        ["colour", "mood", "furniture"],
        distinct_rows(COLOURS, 48, 2, 2000),
        distinct_rows(COLOURS, 24, 3, 3000),
    )
    return root


def permute_test_labels(src: Path, dst: Path, seed: int) -> Path:
    """A copy of the task folders whose test rows carry shuffled labels (same inputs)."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    for task in dst.iterdir():
        rows = [json.loads(x) for x in (task / "test.jsonl").read_text().splitlines()]
        labels = rng.permutation([r["label"] for r in rows])
        (task / "test.jsonl").write_text(
            "".join(
                json.dumps({"text": r["text"], "label": int(y)}) + "\n"
                for r, y in zip(rows, labels)
            )
        )
    return dst
