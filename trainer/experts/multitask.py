"""The "Traditional MTL" reference: ONE backbone with one head per task, fine-tuned jointly on
every task's train split (each step: ``finetune.batch_size`` rows of every task)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..backbones import Backbone
from ..config import FinetuneConfig, MultitaskConfig
from ..data.tasks import TaskData
from .cache import Trained, cache_key, cached_training
from .checkpoints import StateDict
from .finetune import HEAD_SCALE, train_classifier


def train_multitask(
    base: Backbone,
    base_state: StateDict,
    tasks: list[TaskData],
    *,
    finetune: FinetuneConfig,
    multitask: MultitaskConfig,
    cache_dir: Path,
    device: torch.device,
) -> Trained:
    """The jointly fine-tuned backbone and its heads, from the cache or trained (then cached).
    ``multitask.steps`` / ``lr`` of 0 take the ``finetune`` values."""
    cfg = dataclasses.replace(
        finetune, steps=multitask.steps or finetune.steps, lr=multitask.lr or finetune.lr
    )
    settings = {**cfg.__dict__, "head_scale": HEAD_SCALE if base.normalize_head else None}
    key = cache_key("multitask", base.spec(), base_state, [t.train_key for t in tasks], settings)
    return cached_training(
        "multitask",
        "-".join(t.name for t in tasks)[:60],
        key,
        cache_dir,
        base_state,
        lambda: train_classifier(
            base, tasks, cfg, device, base.normalize_head, desc="fine-tune multitask"
        ),
    )
