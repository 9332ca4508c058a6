"""The built-in demo suite: seeded synthetic text tasks, generated on the fly.

Needs no network and no ``../shared``. Every sentence mentions a creature, a place, a time of
day and a feeling, among distractor words; each task asks about a different one of them, so the
experts specialise the same shared features in conflicting directions and a merged backbone
visibly loses to them (the setting surgery repairs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = {
    "creature": {
        "bird": ["sparrow", "eagle", "parrot", "owl", "pigeon", "heron", "crow", "finch"],
        "fish": ["salmon", "trout", "shark", "tuna", "carp", "eel", "cod", "pike"],
        "mammal": ["horse", "tiger", "rabbit", "wolf", "bear", "goat", "fox", "deer"],
        "insect": ["beetle", "ant", "wasp", "moth", "cricket", "bee", "fly", "locust"],
    },
    "place": {
        "water": ["by the lake", "on the river", "near the sea", "at the harbour", "in the pond"],
        "city": [
            "in the city",
            "by the station",
            "near the market",
            "on the avenue",
            "at the square",
        ],
        "forest": [
            "in the woods",
            "under the pines",
            "in the forest",
            "among the oaks",
            "in the jungle",
        ],
        "mountain": [
            "on the peak",
            "up the mountain",
            "on the ridge",
            "in the alps",
            "by the summit",
        ],
    },
    "time": {
        "morning": ["at dawn", "early in the morning", "at sunrise", "before breakfast"],
        "afternoon": ["at noon", "after lunch", "in the afternoon", "at midday"],
        "evening": ["at dusk", "in the evening", "at sunset", "before dinner"],
        "night": ["at midnight", "late at night", "in the dark", "under the stars"],
    },
    "feeling": {
        "positive": ["happily", "calmly", "joyfully", "proudly", "gracefully", "cheerfully"],
        "negative": ["sadly", "angrily", "nervously", "wearily", "fearfully", "gloomily"],
    },
}
VERBS = ["moved", "rested", "waited", "wandered", "appeared", "stayed", "was seen", "returned"]
FILLERS = ["today", "again", "once more", "as usual", "for a while", "quietly", "suddenly", ""]
TASKS = ("creature", "place", "time", "feeling")


def _sentence(rng: np.random.Generator, labels: dict[str, int]) -> str:
    def pick(kind):
        words = VOCAB[kind][list(VOCAB[kind])[labels[kind]]]
        return words[rng.integers(len(words))]

    parts = [
        f"the {pick('creature')} {VERBS[rng.integers(len(VERBS))]}",
        pick("feeling"),
        pick("place"),
        pick("time"),
        FILLERS[rng.integers(len(FILLERS))],
    ]
    head, rest = parts[0], parts[1:]
    rng.shuffle(rest)
    return " ".join(p for p in [head, *rest] if p) + "."


def generate(
    root: Path, seed: int = 0, train: int = 600, test: int = 300, tasks: tuple[str, ...] = TASKS
) -> Path:
    """Write one folder per task (train.jsonl, test.jsonl, labels.json) under ``root``."""
    rng = np.random.default_rng(seed)
    for task in tasks:
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        classes = list(VOCAB[task])
        (folder / "labels.json").write_text(json.dumps(classes))
        for split, count in (("train", train), ("test", test)):
            lines = []
            for _ in range(count):
                labels = {kind: int(rng.integers(len(VOCAB[kind]))) for kind in VOCAB}
                lines.append(json.dumps({"text": _sentence(rng, labels), "label": labels[task]}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root
