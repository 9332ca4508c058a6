"""The fine-tuning loop shared by experts, the pre-trained base and the multitask reference:
full fine-tuning of a copy of the backbone plus fresh linear heads (AdamW, linear warm-up then
cosine decay, gradient clipping at 1)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..backbones.base import to_device
from ..config import FinetuneConfig
from ..data.sampling import EpochSampler
from ..data.tasks import TaskData
from ..progress import progress
from .cache import Trained

# Heads on L2-normalised features (CLIP-style backbones) are trained with CLIP's logit scale
# and stored with it folded in (W <- s·W, b <- s·b): without it a linear head on unit vectors
# cannot reach confident logits in a few hundred steps and the experts stay badly undertrained.
HEAD_SCALE = 100.0


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def augment_images(pixels: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard small-image augmentation: random crop of a ``pad``-padded image (reflect)
    and a random horizontal flip, per image, on normalised pixel values [N, 3, H, W]."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(pixels)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_classifier(
    base: Backbone,
    tasks: list[TaskData],
    cfg: FinetuneConfig,
    device: torch.device,
    normalize_head: bool = False,
    augment: bool = False,
    desc: str = "fine-tune",
) -> Trained:
    """Full fine-tuning of a copy of ``base`` with one fresh linear head per task.

    Every step takes ``cfg.batch_size`` training rows of EVERY task and minimises the mean of
    the tasks' cross-entropies (one task: plain fine-tuning). With ``normalize_head`` the
    logits are ``HEAD_SCALE · head(f / |f|)`` and the stored head has the scale folded in.
    """
    torch.manual_seed(cfg.seed)
    scale = HEAD_SCALE if normalize_head else 1.0
    model = copy.deepcopy(base).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    heads = torch.nn.ModuleList(
        torch.nn.Linear(model.feature_dim, task.num_classes) for task in tasks
    ).to(device)
    for head in heads:
        torch.nn.init.normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": heads.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    samplers = [EpochSampler(len(task.train), cfg.batch_size, rng) for task in tasks]
    bar = progress(range(cfg.steps), desc, "step")
    running = None
    for step in bar:
        factor = _lr_factor(step, cfg.steps, cfg.warmup)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        loss = 0.0
        for task, head, sampler in zip(tasks, heads, samplers):
            split = task.train.take(sampler.next())
            collated = model.collate(split.inputs)
            if augment and "pixel_values" in collated:
                collated["pixel_values"] = augment_images(collated["pixel_values"], generator)
            features = model(to_device(collated, device))
            logits = (
                head(F.normalize(features, dim=-1)) * scale if normalize_head else head(features)
            )
            labels = torch.as_tensor(split.labels, device=device)
            loss = loss + F.cross_entropy(logits, labels) / len(tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Trained(
        state,
        [(scale * h.weight.detach().cpu(), scale * h.bias.detach().cpu()) for h in heads],
        "fine-tuned",
    )


@torch.no_grad()
def head_accuracy(
    backbone: Backbone,
    head: tuple[torch.Tensor, torch.Tensor],
    split,
    device: torch.device,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``backbone`` + an unnormalised linear ``head`` (weight [C, F],
    bias [C]) on a labelled split."""
    backbone.to(device).eval()
    weight, bias = (t.to(device) for t in head)
    correct = 0
    for start in range(0, len(split), batch_size):
        part = split.take(range(start, min(start + batch_size, len(split))))
        logits = backbone(backbone.batch(part.inputs, device)) @ weight.t() + bias
        correct += (logits.argmax(-1).cpu() == torch.as_tensor(part.labels)).sum().item()
    return correct / len(split)
