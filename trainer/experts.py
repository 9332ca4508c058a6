"""Experts: one fine-tuned backbone + linear head per task.

Either loaded from a checkpoint named in the config, or fully fine-tuned here from the base on
the task's train split (AdamW, linear warm-up then cosine decay) and cached under
``<cache>/experts`` by a hash of everything that determines them.
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


@dataclass
class Expert:
    task: str
    state: StateDict  # backbone weights, same names and shapes as the base
    head_weight: torch.Tensor  # [C, F]
    head_bias: torch.Tensor  # [C]
    source: str  # "checkpoint" | "cache" | "fine-tuned"


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


def save_expert(path: Path, expert: Expert, metadata: dict) -> None:
    tensors = {f"backbone.{k}": v.contiguous() for k, v in expert.state.items()}
    tensors["head.weight"] = expert.head_weight.contiguous()
    tensors["head.bias"] = expert.head_bias.contiguous()
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


def finetune(
    base: Backbone,
    task: TaskData,
    cfg: FinetuneConfig,
    device: torch.device,
    normalize_head: bool = False,
) -> Expert:
    """Full fine-tuning of a copy of the base plus a fresh linear head on the train split."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    head = torch.nn.Linear(model.feature_dim, task.num_classes).to(device)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    rng = np.random.default_rng(cfg.seed)
    order, cursor = rng.permutation(len(task.train)), 0
    bar = progress(range(cfg.steps), f"fine-tune {task.name}", "step")
    running = None
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = rng.permutation(len(task.train)), 0
        rows = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        split = task.train.take(rows)
        batch = to_device(model.collate(split.inputs), device)
        labels = torch.as_tensor(split.labels, device=device)
        factor = _lr_factor(step, cfg.steps, cfg.warmup)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        features = model(batch)
        if normalize_head:
            features = F.normalize(features, dim=-1)
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Expert(
        task.name,
        state,
        head.weight.detach().cpu().clone(),
        head.bias.detach().cpu().clone(),
        "fine-tuned",
    )


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
    key = fingerprint(CACHE_VERSION, key_parts, task.fingerprint, cfg.__dict__)
    path = cache_dir / "experts" / f"{task.name}-{key}.safetensors"
    stamp = path.with_suffix(".json")
    if path.is_file() and stamp.is_file():
        try:
            meta = json.loads(stamp.read_text())
            if meta.get("key") != key:
                log.warning("expert cache %s belongs to another config; rebuilding", path)
            elif sha256_file(path) != meta.get("sha256"):
                log.warning("expert cache %s is corrupt (sha256 mismatch); rebuilding", path)
            else:
                tensors = load_file(str(path))
                state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
                check_compatible(base_state, state, f"cached expert {path}")
                return Expert(
                    task.name, state, tensors["head.weight"], tensors["head.bias"], "cache"
                )
        except (UserError, OSError, json.JSONDecodeError, KeyError) as exc:
            log.warning("expert cache %s is unreadable (%s); rebuilding", path, exc)
    expert = finetune(base, task, cfg, device, normalize_head)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_expert(path, expert, {"key": key, "task": task.name})
    write_json_atomic(stamp, {"key": key, "task": task.name, "sha256": sha256_file(path)})
    return expert
