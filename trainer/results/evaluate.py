"""Evaluation: per-task top-1 accuracy and the representation bias (Def. IV.1 of the paper),
both from ONE pass over a split (test or validation); and the validation score merge
hyper-parameters are chosen by."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbones import Backbone
from ..backbones.base import length_order, to_device
from ..data.tasks import Split
from ..progress import progress
from ..surgery.features import Targets
from ..surgery.model import Heads, MultiTaskModel


@dataclass
class Evaluation:
    """One model scored on one split, task by task.

    ``correct`` keeps every scored row (not only the mean) so that intervals and paired tests
    between two rows scored on the same inputs can be computed; ``predictions`` lets a split
    without labels be scored by agreement with the experts.
    """

    acc: dict[str, float | None]  # per task; None without labels
    correct: dict[str, np.ndarray | None]  # per task: bool [N], row i predicted right
    bias: list[float] = field(default_factory=list)  # per-block mean L1 bias; [] if not computed
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # per task: int64 [N]

    @property
    def avg(self) -> float | None:
        """Mean accuracy over the tasks with labels (None when no task has any)."""
        scored = [v for v in self.acc.values() if v is not None]
        return sum(scored) / len(scored) if scored else None

    @classmethod
    def from_predictions(
        cls,
        predictions: dict[str, np.ndarray],
        labels: dict[str, np.ndarray | None],
        bias: list[float] | None = None,
    ) -> Evaluation:
        """Accuracy and per-row correctness of ``predictions`` against ``labels``."""
        correct = {
            name: None if labels[name] is None else np.asarray(pred) == np.asarray(labels[name])
            for name, pred in predictions.items()
        }
        acc = {
            n: None if c is None else float(c.mean()) if len(c) else 0.0 for n, c in correct.items()
        }
        return cls(acc, correct, list(bias or []), dict(predictions))

    def agreement(self, reference: Evaluation) -> dict[str, float]:
        """Per task, the share of rows predicted as ``reference`` predicts them (the experts'
        predictions: the score when a split has no labels)."""
        return {
            name: float((pred == reference.predictions[name]).mean()) if len(pred) else 0.0
            for name, pred in self.predictions.items()
        }


@torch.no_grad()
def evaluate_task(
    model: MultiTaskModel,
    task_index: int,
    split: Split,
    batch_size: int,
    device: torch.device,
    expert: Targets | None = None,
    desc: str = "eval",
) -> tuple[np.ndarray, list[float] | None]:
    """The predicted class of every row (int64 [N], every row routed to ``task_index``);
    with the expert's representations of the same rows, also the bias b_l: the per-sample,
    per-dimension L1 distance to the expert at every block and at the final representation
    ([L + 1]), which needs no labels."""
    model.eval()
    order = length_order(split.inputs)
    num_classes = model.heads.num_classes[task_index]
    predictions = np.empty(len(order), dtype=np.int64)
    bias = torch.zeros(model.backbone.num_blocks + 1, dtype=torch.float64)
    for start in progress(range(0, len(order), batch_size), desc, "batch"):
        rows = order[start : start + batch_size]
        part = split.take(rows)
        batch = model.backbone.batch(part.inputs, device)
        task_ids = torch.full((len(rows),), task_index, dtype=torch.long, device=device)
        final, means = model.representations(batch, task_ids, block_means=expert is not None)
        logits = model.heads(final, task_ids)[:, :num_classes]
        predictions[rows] = logits.argmax(-1).cpu().numpy()
        if expert is not None:
            target = expert.take(torch.as_tensor(rows))
            for index, mean in enumerate(means):
                bias[index] += (mean.float().cpu() - target.blocks[:, index]).abs().mean(-1).sum()
            bias[-1] += (final.float().cpu() - target.final).abs().mean(-1).sum()
    return predictions, ((bias / max(len(order), 1)).tolist() if expert is not None else None)


@torch.no_grad()
def predictions_from_features(
    heads: Heads, task_index: int, final: torch.Tensor, device: torch.device
) -> np.ndarray:
    """The predicted class (int64 [N]) of task ``task_index``'s head on precomputed final
    representations [N, F]."""
    task_ids = torch.full((len(final),), task_index, dtype=torch.long, device=device)
    logits = heads(final.to(device), task_ids)[:, : heads.num_classes[task_index]]
    return logits.argmax(-1).cpu().numpy()


def accuracy_from_features(
    heads: Heads, task_index: int, final: torch.Tensor, labels, device: torch.device
) -> float | None:
    """Top-1 accuracy of task ``task_index``'s head on precomputed final representations
    (None without labels)."""
    if labels is None:
        return None
    pred = predictions_from_features(heads, task_index, final, device)
    return float((pred == np.asarray(labels)).mean())


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
