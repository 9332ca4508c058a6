"""Evaluation: per-task top-1 accuracy and the representation bias (Def. IV.1 of the paper),
both from ONE pass over the test split; and the validation score merge hyper-parameters are
chosen by."""

from __future__ import annotations

import torch

from ..backbones import Backbone
from ..backbones.base import length_order, to_device
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


class ValidationScorer:
    """Scores backbone states on every task's validation inputs: per task, the share of rows
    whose prediction (the task's own head) equals its target, a label (accuracy) or the task
    expert's prediction (agreement); the score is the mean over tasks.

    A grid search scores many states of one architecture: ONE backbone module is reused (each
    state is loaded into it) and the inputs are collated once.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: Heads,
        inputs: list[list],
        device: torch.device,
        batch_size: int,
    ):
        self.backbone, self.heads, self.device = backbone.to(device).eval(), heads, device
        self.batches = []  # per task: [(collated inputs on the CPU, their rows)]
        for pool in inputs:
            order = length_order(pool)
            self.batches.append(
                [
                    (backbone.collate([pool[i] for i in rows]), torch.as_tensor(rows))
                    for rows in (
                        order[start : start + batch_size]
                        for start in range(0, len(order), batch_size)
                    )
                ]
            )
        # per task [N_t]: the labels (accuracy) or the expert's predictions (agreement)
        self.targets: list[torch.Tensor] = []

    @torch.no_grad()
    def predictions(self, state: dict, tasks: list[int] | None = None) -> list[torch.Tensor]:
        """The predicted class of every validation row [N_t] of each task in ``tasks``
        (default all) with the backbone holding ``state``."""
        self.backbone.load_state_dict(state)
        out = []
        for t in range(len(self.batches)) if tasks is None else tasks:
            rows_total = sum(len(rows) for _, rows in self.batches[t])
            pred = torch.empty(rows_total, dtype=torch.long)
            for collated, rows in self.batches[t]:
                final = self.backbone(to_device(collated, self.device))
                task_ids = torch.full((len(rows),), t, dtype=torch.long, device=self.device)
                logits = self.heads(final, task_ids)[:, : self.heads.num_classes[t]]
                pred[rows] = logits.argmax(-1).cpu()
            out.append(pred)
        return out

    def __call__(self, state: dict) -> tuple[float, list[float]]:
        """(mean over tasks, per task) share of rows predicted as their targets."""
        per_task = [
            (pred == target).float().mean().item()
            for pred, target in zip(self.predictions(state), self.targets)
        ]
        return sum(per_task) / len(per_task), per_task
