"""Task data formats and their errors."""

import json

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, write_text_task
from trainer.data.tasks import load_task
from trainer.errors import UserError


def test_jsonl_task_and_limits(text_tasks):
    task = load_task("animals", "{data}/animals", text_tasks, train_limit=10)
    assert task.modality == "text" and task.classes == ["animal", "vehicle"]
    assert len(task.train) == 10 and len(task.test) == 24
    assert sorted(set(task.train.labels.tolist())) == [0, 1]  # balanced prefix


def test_npz_task(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "t.npz",
        x_train=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        y_train=np.array([0, 1, 0, 1, 0, 1]),
        x_test=np.zeros((2, 8, 8, 3), np.uint8),
        y_test=np.array([0, 1]),
        classes=np.array(["a", "b"]),
    )
    task = load_task("t", str(tmp_path / "t.npz"), tmp_path)
    assert task.modality == "image" and task.train.inputs.shape == (6, 8, 8, 3)


def test_image_folder_task(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            d = tmp_path / "pets" / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (10, 12), (10, 20, 30)).save(d / "a.png")
    task = load_task("pets", str(tmp_path / "pets"), tmp_path)
    assert task.classes == ["cats", "dogs"] and len(task.train) == 2
    (tmp_path / "pets" / "test" / "cats" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot decode image .*bad.jpg"):
        load_task("pets", str(tmp_path / "pets"), tmp_path)


@pytest.mark.skipif(not (SHARED_DATA / "images" / "dtd10.npz").is_file(), reason="needs ../shared")
def test_shared_npz_layout_reads():
    task = load_task("dtd10", "{data}/images/dtd10.npz", SHARED_DATA, test_limit=20)
    assert task.num_classes == 10 and len(task.test) == 20


def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(UserError) as err:
        load_task("x", str(tmp_path / "nowhere"), tmp_path)
    assert "nowhere" in str(err.value) and "train.jsonl" in str(err.value)


def test_label_outside_labels_json(tmp_path):
    write_text_task(tmp_path / "t", ["a", "b"], [("x", 0), ("y", 2)], [("z", 1)])
    with pytest.raises(UserError, match="label 2, outside the 2 classes"):
        load_task("t", str(tmp_path / "t"), tmp_path)


def test_empty_task(tmp_path):
    write_text_task(tmp_path / "t", ["a", "b"], [], [("z", 1)])
    with pytest.raises(UserError, match="train split .* is empty"):
        load_task("t", str(tmp_path / "t"), tmp_path)


def test_malformed_jsonl_line(tmp_path):
    folder = write_text_task(tmp_path / "t", ["a"], [("x", 0)], [("z", 0)])
    (folder / "train.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1 is not a JSON object"):
        load_task("t", str(folder), tmp_path)
