"""Evaluation: per-task top-1 accuracy, and the representation bias of PAPER.md (Def. IV.1)."""

from __future__ import annotations

import torch

from .data import Split
from .model import MultiTaskModel
from .utils import length_order, progress, to_device


@torch.no_grad()
def accuracy(model: MultiTaskModel, task_index: int, split: Split, batch_size: int,
             device: torch.device, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` on ``split`` with every row routed to ``task_index``."""
    model.eval()
    order = length_order(split.inputs)
    correct = 0
    num_classes = model.heads.num_classes[task_index]
    for start in progress(range(0, len(order), batch_size), desc, "batch"):
        part = split.take(order[start : start + batch_size])
        batch = to_device(model.backbone.collate(part.inputs), device)
        task_ids = torch.full((len(part),), task_index, dtype=torch.long, device=device)
        logits = model(batch, task_ids)[:, :num_classes]
        correct += (logits.argmax(-1).cpu() == torch.as_tensor(part.labels)).sum().item()
    return correct / len(order)
