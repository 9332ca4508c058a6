"""python -m trainer.fit with experts in their libraries' formats: transformers classifiers
merged and repaired end to end, a task with no labels at all, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.trainer.experts_kit import write_family
from trainer.data.tasks import load_task
from trainer.fit import main
from trainer.results.bundle import load_bundle

CLASSES = {"animals": ["animal", "vehicle"], "colours": ["colour", "mood", "furniture"]}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("experts"), "bert", CLASSES)


def _config(tmp_path, bert, tasks: str, pooling: str = "cls") -> str:
    path = tmp_path / "experts.toml"
    path.write_text(f"""
name = "experts"
[backbone]
kind = "hf_text"
path = "{bert / "base"}"
max_length = 16
pooling = "{pooling}"
[eval]
batch_size = 16
[merge]
methods = ["task_arithmetic"]
[surgery]
modes = ["none", "surgeryv2"]
rank = 4
iterations = 3
batch_size = 8
# transductive: the text_tasks fixture repeats its six sentences per task in train and test
unlabeled = "test"
{tasks}""")
    return str(path)


def _tasks(bert, **paths) -> str:
    return "".join(
        f'[[tasks]]\nname = "{name}"\npath = "{path}"\nexpert = "{bert / name}"\n'
        for name, path in paths.items()
    )


def _run(config, tmp_path) -> int:
    out, cache = tmp_path / "out", tmp_path / "cache"
    return main(
        ["--config", config, "--data", str(tmp_path / "data"), "--out", str(out)]
        + [
            "--cache",
            str(cache),
            "--device",
            "cpu",
        ]
    )


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@torch.no_grad()
def _library_accuracy(folder, texts, labels) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        texts, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    predicted = model(**batch).logits.argmax(-1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def test_transformers_experts_merged_and_repaired(tmp_path, text_tasks, bert, capsys):
    config = _config(
        tmp_path, bert, _tasks(bert, animals="{data}/animals", colours="{data}/colours")
    )
    assert _run(config, tmp_path) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    individual = results["rows"][0]
    for name in CLASSES:
        task = load_task(name, f"{{data}}/{name}", text_tasks)
        want = _library_accuracy(bert / name, task.test.inputs, task.test.labels)
        assert individual["acc"][name] == pytest.approx(want, abs=1e-6)  # a float32 mean
    assert results["no_labels"] == [] and "task_arithmetic w/ SurgeryV2" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    assert manifest["heads"] == {"normalize": False, "hidden": 32, "activation": "tanh"}
    model, _ = load_bundle(tmp_path / "out" / "bundle")
    library = AutoModelForSequenceClassification.from_pretrained(bert / "colours")
    head = model.heads.task_head(1)
    torch.testing.assert_close(head.hidden_weight, library.bert.pooler.dense.weight)
    torch.testing.assert_close(head.weight, library.classifier.weight)


def test_a_task_without_any_labels(tmp_path, text_tasks, bert, capsys):
    """colours comes as a plain text file of inputs: no labels, no train split, no class
    names (they come from the expert's id2label). Surgery still runs; it is not scored."""
    rows = [json.loads(x) for x in (text_tasks / "colours" / "test.jsonl").read_text().splitlines()]
    (text_tasks / "colours.txt").write_text("".join(r["text"] + "\n" for r in rows))
    tasks = _tasks(bert, animals="{data}/animals", colours="{data}/colours.txt")
    assert _run(_config(tmp_path, bert, tasks), tmp_path) == 0
    table = capsys.readouterr().out
    assert "no labels" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["no_labels"] == ["colours"]
    for row in results["rows"]:
        assert row["acc"]["colours"] is None and row["avg"] == row["acc"]["animals"]
    assert len(results["bias"]["task_arithmetic/surgeryv2"]) == 3  # measured without labels
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    assert manifest["tasks"][1]["classes"] == CLASSES["colours"]


def test_refusals_are_one_line_and_write_nothing(tmp_path, text_tasks, bert, capsys):
    cases = [
        (  # the class count of the data disagrees with the head
            _tasks(bert, animals="{data}/colours"),
            "cls",
            "its head has 2 classes, task 'animals' has 3",
        ),
        (  # a hub id that is not cached while offline
            '[[tasks]]\nname = "animals"\npath = "{data}/animals"\nexpert = "nobody/no-model"\n',
            "cls",
            "HF_HUB_OFFLINE=1",
        ),
        (  # the pooling the heads read
            _tasks(bert, animals="{data}/animals"),
            "mean",
            'set [backbone] pooling = "cls"',
        ),
        (  # one task with a pooler head, one fine-tuned here (linear)
            _tasks(bert, animals="{data}/animals")
            + '[[tasks]]\nname = "colours"\npath = "{data}/colours"\n',
            "cls",
            "one multi-task model has one head form",
        ),
        (  # nothing to fine-tune on and no expert
            '[[tasks]]\nname = "animals"\npath = "{data}/animals/test.jsonl"\n',
            "cls",
            "no labelled train split",
        ),
    ]
    for tasks, pooling, expected in cases:
        assert _run(_config(tmp_path, bert, tasks, pooling), tmp_path) == 2
        assert expected in _error(capsys)
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "experts").exists()


@torch.no_grad()
def _library_predictions(folder, texts) -> list[str]:
    """The class NAMES transformers predicts for ``texts`` (through its id2label)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        texts, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    return [model.config.id2label[int(i)] for i in model(**batch).logits.argmax(-1)]


def test_an_expert_with_the_classes_in_another_order(tmp_path, text_tasks, bert, capsys, caplog):
    """The colours expert's id2label is colour, mood, furniture; this task's labels.json lists
    them reversed. Its labels are the expert's own predictions (by name) on 3 rows in 4, so
    transformers scores it 75 %: the individual row must read the same, not the ~0-33 % a
    silently permuted head would."""
    texts = [f"the {w} was here today" for w in ("red", "sad", "table", "cat", "blue") * 6]
    names = list(reversed(CLASSES["colours"]))
    predicted = _library_predictions(bert / "colours", texts)
    labels = [
        names.index(p) if i % 4 else (names.index(p) + 1) % 3 for i, p in enumerate(predicted)
    ]
    folder = text_tasks / "reversed"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps(names))
    rows = [json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)]
    (folder / "test.jsonl").write_text("".join(rows))
    want = float(np.mean([names[y] == p for y, p in zip(labels, predicted)]))
    assert want == pytest.approx(0.75, abs=0.05)
    unmapped = float(
        np.mean([names[y] == names[CLASSES["colours"].index(p)] for y, p in zip(labels, predicted)])
    )
    assert abs(unmapped - want) > 0.3  # what the old count-only check reported

    tasks = _tasks(bert, animals="{data}/animals") + (
        f'[[tasks]]\nname = "colours"\npath = "{{data}}/reversed"\nexpert = "{bert / "colours"}"\n'
    )
    config = _config(tmp_path, bert, tasks)
    text = Path(config).read_text().replace('"none", "surgeryv2"', '"none"')
    Path(config).write_text(text.replace('"task_arithmetic"', '"weight_averaging"'))
    caplog.set_level("INFO", logger="deepsurgery")
    assert _run(config, tmp_path) == 0
    individual = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert individual["acc"]["colours"] == pytest.approx(want, abs=1e-6)
    lines = [r.getMessage() for r in caplog.records if "another order" in r.getMessage()]
    assert len(lines) == 1 and "(colour, mood, furniture)" in lines[0]
