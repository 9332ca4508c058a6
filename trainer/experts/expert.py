"""Where each task's expert comes from: its checkpoint, the cache, or fine-tuning here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import Backbone
from ..config import FinetuneConfig
from ..data.tasks import TaskData
from .cache import cache_key, cached_training
from .checkpoints import StateDict, load_checkpoint
from .finetune import HEAD_SCALE, train_classifier


@dataclass
class Expert:
    task: str
    state: StateDict  # backbone weights, same names and shapes as the base
    head_weight: torch.Tensor  # [C, F]
    head_bias: torch.Tensor  # [C]
    source: str  # "checkpoint" | "cache" | "fine-tuned"


def get_expert(
    task: TaskData,
    *,
    checkpoint: str,
    base: Backbone,
    base_state: StateDict,
    finetune: FinetuneConfig,
    cache_dir: Path,
    device: torch.device,
) -> Expert:
    """The task's expert from its checkpoint, the cache, or by fine-tuning (then cached)."""
    if checkpoint:
        state, weight, bias = load_checkpoint(Path(checkpoint), task, base_state)
        return Expert(task.name, state, weight, bias, "checkpoint")
    settings = {**finetune.__dict__, "head_scale": HEAD_SCALE if base.normalize_head else None}
    key = cache_key("expert", base.spec(), base_state, [task.fingerprint], settings)
    trained = cached_training(
        "experts",
        task.name,
        key,
        cache_dir,
        base_state,
        lambda: train_classifier(
            base, [task], finetune, device, base.normalize_head, desc=f"fine-tune {task.name}"
        ),
    )
    ((weight, bias),) = trained.heads
    return Expert(task.name, trained.state, weight, bias, trained.source)
