"""Logits of one row -> a Prediction (softmax over the task's own classes, top-k)."""

from __future__ import annotations

import numpy as np

from runtime.api import Prediction
from runtime.manifest import Task


def softmax(logits: np.ndarray) -> np.ndarray:
    """[C] -> [C] probabilities, computed in float64 so tiny scores do not underflow to 0."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def prediction(task: Task, logits: np.ndarray, top_k: int) -> Prediction:
    """One task's logits [num_classes] -> Prediction with the top_k (label, score) pairs."""
    probs = softmax(logits)
    k = min(top_k, task.num_classes)
    order = np.argsort(-probs, kind="stable")[:k]
    best = int(order[0]) if k else int(np.argmax(probs))
    return Prediction(
        task=task.name,
        label=task.classes[best],
        score=float(probs[best]),
        top=[(task.classes[i], float(probs[i])) for i in order],
        logits=logits,
        probabilities=probs,
    )
