"""``[pretrain]``: supervised pre-training of the base backbone on a generic labelled corpus.

No pretrained CLIP weights can be had offline, so the vision benchmark first trains its small
open_clip ViT on cifar10 (the experts must share a pretrained base, or task vectors mean
nothing). The result is cached under ``<cache>/pretrain`` by a hash of the backbone, its
initial weights, the corpus and the settings; its test accuracy is recomputed (seconds) and
reported so a user can see how good the base is.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..backbones import Backbone
from ..config import FinetuneConfig, PretrainConfig
from ..data.tasks import load_task
from .cache import cache_key, cached_training
from .finetune import head_accuracy, train_classifier

log = logging.getLogger("deepsurgery")


def pretrain_base(
    base: Backbone, cfg: PretrainConfig, data_root: Path, cache: Path, device: torch.device
) -> dict:
    """Load (or train and cache) the pre-trained weights INTO ``base``; return a summary."""
    started = time.perf_counter()
    corpus = load_task(cfg.name, cfg.path, data_root, cfg.train_limit, cfg.test_limit)
    init = {k: v.detach().clone() for k, v in base.state_dict().items()}
    run = FinetuneConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        head_lr=cfg.lr,
        seed=cfg.seed,
    )
    key = cache_key("pretrain", base.spec(), init, [corpus.fingerprint], cfg.__dict__)
    trained = cached_training(
        "pretrain",
        corpus.name,
        key,
        cache,
        init,
        lambda: train_classifier(
            base, [corpus], run, device, augment=cfg.augment, desc=f"pre-train on {corpus.name}"
        ),
    )
    base.load_state_dict(trained.state)
    accuracy = head_accuracy(base, trained.heads[0], corpus.test, device)
    base.cpu()
    info = {
        "corpus": corpus.name,
        "train_rows": len(corpus.train),
        "test_rows": len(corpus.test),
        "steps": cfg.steps,
        "test_accuracy": accuracy,
        "source": trained.source,
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info(
        "pre-trained base on %s (%s): test accuracy %.1f%%",
        corpus.name,
        trained.source,
        100 * accuracy,
    )
    return info
