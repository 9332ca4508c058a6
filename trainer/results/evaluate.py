"""Evaluation: per-task top-1 accuracy and the representation bias (Def. IV.1 of the paper),
both from ONE pass over the test split."""

from __future__ import annotations

import torch

from ..backbones.base import length_order
from ..data.tasks import Split
from ..progress import progress
from ..surgery.features import Targets
from ..surgery.model import Heads, MultiTaskModel


@torch.no_grad()
def evaluate_task(
    model: MultiTaskModel,
    task_index: int,
    split: Split,
    batch_size: int,
    device: torch.device,
    expert: Targets | None = None,
    desc: str = "eval",
) -> tuple[float | None, list[float] | None]:
    """Top-1 accuracy with every row routed to ``task_index`` (None when the split has no
    labels); with the expert's representations of the same rows, also the bias b_l: the
    per-sample, per-dimension L1 distance to the expert at every block and at the final
    representation ([L + 1]), which needs no labels."""
    model.eval()
    order = length_order(split.inputs)
    num_classes = model.heads.num_classes[task_index]
    correct = 0
    bias = torch.zeros(model.backbone.num_blocks + 1, dtype=torch.float64)
    for start in progress(range(0, len(order), batch_size), desc, "batch"):
        rows = order[start : start + batch_size]
        part = split.take(rows)
        batch = model.backbone.batch(part.inputs, device)
        task_ids = torch.full((len(rows),), task_index, dtype=torch.long, device=device)
        final, means = model.representations(batch, task_ids, block_means=expert is not None)
        logits = model.heads(final, task_ids)[:, :num_classes]
        if part.labels is not None:
            correct += (logits.argmax(-1).cpu() == torch.as_tensor(part.labels)).sum().item()
        if expert is not None:
            target = expert.take(torch.as_tensor(rows))
            for index, mean in enumerate(means):
                bias[index] += (mean.float().cpu() - target.blocks[:, index]).abs().mean(-1).sum()
            bias[-1] += (final.float().cpu() - target.final).abs().mean(-1).sum()
    accuracy = None if split.labels is None else correct / len(order)
    return accuracy, ((bias / len(order)).tolist() if expert is not None else None)


@torch.no_grad()
def accuracy_from_features(
    heads: Heads, task_index: int, final: torch.Tensor, labels, device: torch.device
) -> float | None:
    """Top-1 accuracy of task ``task_index``'s head on precomputed final representations
    (None without labels)."""
    if labels is None:
        return None
    task_ids = torch.full((len(final),), task_index, dtype=torch.long, device=device)
    logits = heads(final.to(device), task_ids)[:, : heads.num_classes[task_index]]
    return (logits.argmax(-1).cpu() == torch.as_tensor(labels)).float().mean().item()
