"""Shared fixtures: tiny seeded models and task folders built in milliseconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPSURGERY_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-block, 32-wide BERT with MiniLM's tokenizer and seeded random weights."""
    # imported here, not at the top: the runtime's tests run without torch or the trainer
    import torch
    from transformers import BertConfig, BertModel

    from trainer.backbones.hf_text import minilm_dir

    out = tmp_path_factory.mktemp("tiny-bert")
    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(src / name, out / name)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    return out


def write_text_task(
    folder: Path, classes: list[str], train: list[tuple[str, int]], test: list[tuple[str, int]]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(classes))
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
        )
    return folder


def keyword_rows(words: list[list[str]], n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is the class of the keyword they contain."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(len(words)))
        word = words[label][rng.integers(len(words[label]))]
        rows.append((f"we saw the {word} there today", label))
    return rows


@pytest.fixture
def text_tasks(tmp_path) -> Path:
    """Two small text tasks under tmp_path/data."""
    root = tmp_path / "data"
    animals = [["cat", "dog", "horse"], ["car", "bus", "train"]]
    colours = [["red", "blue"], ["happy", "sad"], ["table", "chair"]]
    write_text_task(
        root / "animals",
        ["animal", "vehicle"],
        keyword_rows(animals, 48, 0),
        keyword_rows(animals, 24, 1),
    )
    write_text_task(
        root / "colours",
        ["colour", "mood", "furniture"],
        keyword_rows(colours, 48, 2),
        keyword_rows(colours, 24, 3),
    )
    return root


@pytest.fixture
def tiny_config(tmp_path, tiny_bert_dir, text_tasks) -> Path:
    """A complete config on the tiny BERT and two tasks, fast enough for unit tests."""
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
[backbone]
kind = "hf_text"
path = "{tiny_bert_dir}"
max_length = 16
[finetune]
steps = 8
batch_size = 8
lr = 1e-3
[eval]
batch_size = 16
[merge]
methods = ["weight_averaging", "task_arithmetic", "ties_merging"]
[surgery]
modes = ["none", "surgery", "surgeryv2"]
methods = ["task_arithmetic"]
rank = 4
iterations = 5
batch_size = 8
# the transductive pool: the fixture's train and test sentences repeat the same six texts
# per task, so the inductive pool (train inputs minus copies of test inputs) would be empty
unlabeled = "test"
[[tasks]]
name = "animals"
path = "{{data}}/animals"
[[tasks]]
name = "colours"
path = "{{data}}/colours"
""")
    return path


def run_fit(config, tmp_path, *extra) -> int:
    """``python -m trainer.fit`` on ``config`` with data, out and cache under ``tmp_path``."""
    from trainer.fit import main

    return main(
        [
            "--config",
            str(config),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            *extra,
        ]
    )
