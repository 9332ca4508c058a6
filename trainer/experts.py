"""Fine-tuned models: experts, the pre-trained base, and the multi-task reference.

All three are the same loop (:func:`train_classifier`): full fine-tuning of a copy of the
backbone plus fresh linear heads (AdamW, linear warm-up then cosine decay), cached under
``<cache>/<kind>/`` by a hash of everything that determines them, with a sha256 stamp so a
corrupt or foreign entry is detected, logged and rebuilt.

- an **expert** (one task, one head) comes from a checkpoint named in the config, the cache,
  or is fine-tuned here on the task's train split;
- the **pre-trained base** (``[pretrain]``, e.g. a small ViT on cifar10) is the same loop on a
  generic corpus, with light augmentation; its head is kept only to report its accuracy;
- the **multitask** reference (the paper's "Traditional MTL") trains ONE backbone with one head
  per task on every task's train split at once (one sub-batch of every task per step).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .backbones import Backbone
from .config import FinetuneConfig
from .data import TaskData
from .errors import UserError
from .utils import fingerprint, progress, sha256_file, to_device, write_json_atomic

log = logging.getLogger("deepsurgery")
StateDict = dict[str, torch.Tensor]
CACHE_VERSION = 1
# Heads on L2-normalised features (CLIP-style backbones) are trained with CLIP's logit scale
# and stored with it folded in (W <- s·W, b <- s·b): without it a linear head on unit vectors
# cannot reach confident logits in a few hundred steps and the experts stay badly undertrained.
HEAD_SCALE = 100.0


@dataclass
class Expert:
    task: str
    state: StateDict  # backbone weights, same names and shapes as the base
    head_weight: torch.Tensor  # [C, F]
    head_bias: torch.Tensor  # [C]
    source: str  # "checkpoint" | "cache" | "fine-tuned"


@dataclass
class Trained:
    """A fine-tuned backbone with one head per task it was trained on."""

    state: StateDict
    heads: list[tuple[torch.Tensor, torch.Tensor]]  # (weight [C, F], bias [C]) per task
    source: str  # "cache" | "fine-tuned"


def check_compatible(base: StateDict, state: StateDict, where: str) -> None:
    """Experts must share the base's parameter names and shapes; name the first mismatch."""
    for key, tensor in base.items():
        if key not in state:
            raise UserError(
                f"{where}: parameter '{key}' of the base is missing; experts must be "
                "fine-tuned from the configured base backbone"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{where}: parameter '{key}' has shape {list(state[key].shape)}, the "
                f"base has {list(tensor.shape)}; experts must share the base's shapes"
            )
    extra = sorted(set(state) - set(base))
    if extra:
        raise UserError(f"{where}: parameter '{extra[0]}' does not exist in the base backbone")


def _to_tensors(trained: Trained) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v.contiguous() for k, v in trained.state.items()}
    if len(trained.heads) == 1:  # the expert checkpoint format users can also supply
        tensors["head.weight"], tensors["head.bias"] = (t.contiguous() for t in trained.heads[0])
    else:
        for i, (weight, bias) in enumerate(trained.heads):
            tensors[f"head.{i}.weight"], tensors[f"head.{i}.bias"] = weight, bias
    return tensors


def _from_tensors(tensors: dict[str, torch.Tensor], source: str) -> Trained:
    state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if "head.weight" in tensors:
        heads = [(tensors["head.weight"], tensors["head.bias"])]
    else:
        count = len([k for k in tensors if k.startswith("head.") and k.endswith(".weight")])
        heads = [(tensors[f"head.{i}.weight"], tensors[f"head.{i}.bias"]) for i in range(count)]
    return Trained(state, heads, source)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"deepsurgery": json.dumps(metadata)})
    tmp.replace(path)


def load_checkpoint(path: Path, task: TaskData, base: StateDict) -> Expert:
    if not path.is_file():
        raise UserError(
            f"task '{task.name}': expert checkpoint {path} not found (expected a "
            "safetensors file with backbone.* weights and head.weight, head.bias)"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise UserError(
            f"task '{task.name}': cannot read expert checkpoint {path}: {exc}"
        ) from None
    state = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    check_compatible(base, state, f"expert checkpoint {path}")
    if "head.weight" not in tensors or "head.bias" not in tensors:
        raise UserError(f"expert checkpoint {path} has no head.weight / head.bias (the task head)")
    weight, bias = tensors["head.weight"], tensors["head.bias"]
    if weight.shape[0] != task.num_classes:
        raise UserError(
            f"expert checkpoint {path}: head has {weight.shape[0]} classes, task "
            f"'{task.name}' has {task.num_classes}"
        )
    return Expert(task.name, state, weight.float(), bias.float(), "checkpoint")


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
    cursors = [(rng.permutation(len(task.train)), 0) for task in tasks]
    bar = progress(range(cfg.steps), desc, "step")
    running = None
    for step in bar:
        factor = _lr_factor(step, cfg.steps, cfg.warmup)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        loss = 0.0
        for t, (task, head) in enumerate(zip(tasks, heads)):
            order, cursor = cursors[t]
            if cursor + cfg.batch_size > len(order):
                order, cursor = rng.permutation(len(order)), 0
            rows = order[cursor : cursor + cfg.batch_size]
            cursors[t] = (order, cursor + len(rows))
            split = task.train.take(rows)
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


def cached_training(
    kind: str,
    name: str,
    key: str,
    cache_dir: Path,
    base_state: StateDict,
    train,
) -> Trained:
    """``<cache>/<kind>/<name>-<key>.safetensors`` if present, intact and from this config;
    else ``train()`` (then cached). Corrupt or foreign entries are logged and rebuilt."""
    path = cache_dir / kind / f"{name}-{key}.safetensors"
    stamp = path.with_suffix(".json")
    what = {"experts": "expert", "pretrain": "pre-training"}.get(kind, kind)
    if path.is_file() or stamp.is_file():
        try:
            meta = json.loads(stamp.read_text())
            if meta.get("key") != key:
                log.warning("%s cache %s belongs to another config; rebuilding", what, path)
            elif sha256_file(path) != meta.get("sha256"):
                log.warning("%s cache %s is corrupt (sha256 mismatch); rebuilding", what, path)
            else:
                trained = _from_tensors(load_file(str(path)), "cache")
                check_compatible(base_state, trained.state, f"cached {what} {path}")
                return trained
        except (UserError, OSError, json.JSONDecodeError, KeyError) as exc:
            log.warning("%s cache %s is unreadable (%s); rebuilding", what, path, exc)
    trained = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, _to_tensors(trained), {"key": key, "name": name})
    write_json_atomic(stamp, {"key": key, "name": name, "sha256": sha256_file(path)})
    return trained


def get_expert(
    task: TaskData,
    checkpoint: str,
    base: Backbone,
    base_state: StateDict,
    cfg: FinetuneConfig,
    cache_dir: Path,
    key_parts: dict,
    device: torch.device,
    normalize_head: bool = False,
) -> Expert:
    """The task's expert from its checkpoint, the cache, or by fine-tuning (then cached)."""
    if checkpoint:
        return load_checkpoint(Path(checkpoint), task, base_state)
    head = {"head_scale": HEAD_SCALE} if normalize_head else {}  # unnormalised: keys unchanged
    key = fingerprint(
        CACHE_VERSION, key_parts, task.fingerprint, cfg.__dict__, *([head] if head else [])
    )
    trained = cached_training(
        "experts",
        task.name,
        key,
        cache_dir,
        base_state,
        lambda: train_classifier(
            base, [task], cfg, device, normalize_head, desc=f"fine-tune {task.name}"
        ),
    )
    ((weight, bias),) = trained.heads
    return Expert(task.name, trained.state, weight, bias, trained.source)
