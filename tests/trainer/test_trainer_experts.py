"""A suite whose experts were written by transformers itself: two text tasks fine-tuned with
``transformers.Trainer`` from a tiny BERT, saved with ``save_pretrained``, merged and repaired
here; the individual row is the library's own accuracy."""

from __future__ import annotations

import json

import accelerate  # noqa: F401  (transformers.Trainer needs it: a dev dependency)
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from tests.trainer.experts_kit import write_family
from trainer.data.tasks import load_task
from trainer.fit import main

CLASSES = {"animals": ["animal", "vehicle"], "colours": ["colour", "mood", "furniture"]}


def _fine_tune(base, task, out, seed: int) -> None:
    """What a transformers user does: Trainer on the train split, then save_pretrained."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        id2label=dict(enumerate(task.classes)),
        label2id={c: i for i, c in enumerate(task.classes)},
    )
    rows = [
        {**tokenizer(text, truncation=True, max_length=16), "labels": int(label)}
        for text, label in zip(task.train.inputs, task.train.labels)
    ]
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def _library_accuracy(folder, split) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        split.inputs, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    return float((model(**batch).logits.argmax(-1).numpy() == np.asarray(split.labels)).mean())


def test_experts_fine_tuned_by_transformers_trainer(tmp_path, text_tasks):
    base = write_family(tmp_path / "bert", "bert", {}) / "base"
    tasks = {name: load_task(name, f"{{data}}/{name}", text_tasks) for name in CLASSES}
    for seed, (name, task) in enumerate(tasks.items()):
        _fine_tune(base, task, tmp_path / "experts" / name, seed)
    config = tmp_path / "trainer.toml"
    config.write_text(
        f"""
name = "trainer-experts"
[backbone]
path = "{base}"
max_length = 16
pooling = "cls"
[eval]
batch_size = 16
[merge]
methods = ["task_arithmetic", "ties_merging"]
[surgery]
modes = ["none", "surgeryv2"]
methods = ["task_arithmetic"]
rank = 4
iterations = 10
batch_size = 8
# transductive: the text_tasks fixture repeats its six sentences per task in train and test
unlabeled = "test"
"""
        + "".join(
            f'[[tasks]]\nname = "{n}"\npath = "{{data}}/{n}"\nexpert = "{folder}"\n'
            for n, folder in ((n, tmp_path / "experts" / n) for n in CLASSES)
        )
    )
    folders = ["--data", str(text_tasks), "--out", str(tmp_path / "out")]
    assert main(["--config", str(config), *folders, "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    individual = results["rows"][0]["acc"]
    for name, task in tasks.items():
        want = _library_accuracy(tmp_path / "experts" / name, task.test)
        assert individual[name] == pytest.approx(want, abs=1e-6)
    labels = [(r["method"], r["surgery"]) for r in results["rows"]]
    assert ("task_arithmetic", "surgeryv2") in labels and ("ties_merging", "none") in labels
