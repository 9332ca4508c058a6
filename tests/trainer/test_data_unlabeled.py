"""Tasks without labels or without a train split: the shapes they may come in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trainer.data.tasks import load_task
from trainer.errors import UserError


def test_text_inputs_only(tmp_path):
    (tmp_path / "lines.txt").write_text("first input\n\nsecond input\n")
    task = load_task("t", str(tmp_path / "lines.txt"), tmp_path, test_limit=1)
    assert task.train is None and task.classes == [] and not task.labelled
    assert task.test.inputs == ["first input"] and task.test.labels is None
    rows = [{"text": "a"}, {"text": "b", "id": 3}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("t", str(tmp_path / "rows.jsonl"), tmp_path)
    assert task.test.inputs == ["a", "b"] and task.test.labels is None


def test_test_split_only_with_or_without_labels(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    task = load_task("t", str(folder), tmp_path)
    assert task.train is None and task.labelled and task.test.labels.tolist() == [1, 0]
    (folder / "test.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(UserError, match="labels some rows but not all"):
        load_task("t", str(folder), tmp_path)


def test_images_without_labels(tmp_path):
    folder = tmp_path / "wild"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(folder / f"{i}.png")
    task = load_task("w", str(folder), tmp_path)
    assert task.modality == "image" and len(task.test) == 3 and task.test.labels is None
    np.savez(tmp_path / "x.npz", x_test=np.zeros((2, 4, 4, 3), np.uint8))
    task = load_task("x", str(tmp_path / "x.npz"), tmp_path)
    assert task.train is None and task.test.labels is None and task.classes == []
    np.savez(
        tmp_path / "y.npz",
        x_test=np.zeros((2, 4, 4, 3), np.uint8),
        x_train=np.zeros((1, 4, 4, 3), np.uint8),
    )
    with pytest.raises(UserError, match="one of x_train, y_train"):
        load_task("y", str(tmp_path / "y.npz"), tmp_path)
