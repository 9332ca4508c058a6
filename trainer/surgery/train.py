"""Representation surgery (Surgery and SurgeryV2, arXiv 2410.14389) trained without labels.

The merged backbone, the experts and the heads stay frozen; only the adapters of
``MultiTaskModel`` learn, so that for every task t the surgered merged model's per-block
token-means Ẑ_l(t) and final representation match the expert's:

    loss = Σ_t Σ_l ψ(Ẑ_l(t), Z_l(t, expert))        ψ = L1 (default), MSE or 1 − cos
           + β Σ_t KL(h_t(Z_L(t, expert)) ‖ h_t(Ẑ_L(t)))   (β = ``logit_weight``, 0 = the paper's)

The optional second term reads both final representations through the task's own frozen head
h_t (the expert's head): it weighs the representation's errors by what they change in the
prediction, still without labels.

``surgeryv2`` sums over all L blocks and the final representation, ``surgery`` uses the final
representation alone. The expert side needs no gradient: its L + 1 vectors per unlabeled
example are computed once (``features.representations``) and reused every iteration.

One optimizer step per iteration on the summed loss of a batch of every task: the gradient of
exactly the stated objective, and no task's adapters drift on another task's Adam momentum
(the released code steps after each task's batch, so Adam kept moving idle adapters).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampling import EpochSampler
from ..progress import progress
from .features import Targets, final_features
from .model import MultiTaskModel

LOSSES = ("l1", "mse", "cos")
# the adapters' Adam lr over the iterations: held ("constant", the paper's) or annealed to 0
# along a half cosine ("cosine")
SCHEDULES = ("constant", "cosine")


def distance(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """ψ averaged over rows: [B, D] x [B, D] -> scalar."""
    if loss == "l1":
        return F.l1_loss(pred, target)
    if loss == "mse":
        return F.mse_loss(pred, target)
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def logit_divergence(
    model: MultiTaskModel, final: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor
) -> torch.Tensor:
    """KL(expert's prediction ‖ surgered prediction) through each row's task head, averaged
    over rows; padding columns carry probability 0 on both sides."""
    predicted = F.log_softmax(model.heads(final, task_ids), dim=-1)
    with torch.no_grad():
        expert = F.log_softmax(model.heads(target, task_ids), dim=-1)
    return F.kl_div(predicted, expert, log_target=True, reduction="batchmean")


def surgery_loss(
    model: MultiTaskModel,
    batch: dict,
    task_ids: torch.Tensor,
    targets: Targets,
    loss: str,
    logit_weight: float = 0.0,
) -> torch.Tensor:
    """Σ_l ψ(Ẑ_l, Z_l) over the final representation and, for surgeryv2, every block; plus
    ``logit_weight`` × the heads' KL when it is > 0."""
    deep = model.mode == "surgeryv2"
    final, means = model.representations(batch, task_ids, block_means=deep)
    total = final_loss(model, final, targets.final, task_ids, loss, logit_weight)
    for index, mean in enumerate(means):
        total = total + distance(mean, targets.blocks[:, index], loss)
    return total


def final_loss(
    model: MultiTaskModel,
    final: torch.Tensor,
    target: torch.Tensor,
    task_ids: torch.Tensor,
    loss: str,
    logit_weight: float,
) -> torch.Tensor:
    """The final representation's term: ψ, plus ``logit_weight`` × the heads' KL if > 0."""
    total = distance(final, target, loss)
    if logit_weight > 0:
        total = total + logit_weight * logit_divergence(model, final, target, task_ids)
    return total


@dataclass
class SurgeryResult:
    losses: list[float]  # summed loss per iteration
    seconds_per_iteration: float


def train_surgery(
    model: MultiTaskModel,
    unlabeled: list,
    targets: list[Targets],
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    loss: str = "l1",
    schedule: str = "constant",
    logit_weight: float = 0.0,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    callback: Callable[[int, MultiTaskModel], None] | None = None,
    frozen_final: list[torch.Tensor] | None = None,
) -> SurgeryResult:
    """Train ``model``'s adapters so each task's representations match its expert's.

    ``unlabeled[t]`` holds task t's inputs only (no labels exist here); ``targets[t]`` the
    expert's representations of exactly those inputs, row for row. ``callback(i, model)``,
    if given, runs after step i (1-based), e.g. to evaluate along the way; its time is not
    counted in ``seconds_per_iteration``. ``frozen_final`` (Surgery only): the merged
    backbone's final representations of ``unlabeled`` (``features.final_features``), when
    the caller already has them.
    """
    if model.mode == "none":
        return SurgeryResult([], 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.adapter_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown surgery schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations))
        if schedule == "cosine"
        else None
    )
    rng = np.random.default_rng(seed)
    if model.mode != "surgery":
        frozen_final = None
    elif frozen_final is None:
        frozen_final = final_features(model.backbone, unlabeled, device, model.task_names)
    samplers = [EpochSampler(len(pool), batch_size, rng) for pool in unlabeled]
    losses = []
    model.eval()  # no dropout: representations are compared deterministically
    started = time.perf_counter()
    bar = progress(range(iterations), f"{model.mode}", "it")
    aside = 0.0
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for t, (pool, sampler) in enumerate(zip(unlabeled, samplers)):
            rows = sampler.next()
            target = targets[t].take(torch.as_tensor(rows)).to(device)
            task_ids = torch.full((len(rows),), t, dtype=torch.long, device=device)
            if frozen_final is not None:
                adapter = model.final_adapter
                final = adapter(0, frozen_final[t][rows].to(device), adapter.route(task_ids))
                task_loss = final_loss(model, final, target.final, task_ids, loss, logit_weight)
            else:
                batch = model.backbone.batch([pool[i] for i in rows], device)
                task_loss = surgery_loss(model, batch, task_ids, target, loss, logit_weight)
            task_loss.backward()  # gradients of Σ_t accumulate; one step below
            total += task_loss.item()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if callback is not None:
            mark = time.perf_counter()
            callback(step + 1, model)
            model.eval()
            aside += time.perf_counter() - mark
    bar.close()
    for p in params:
        p.requires_grad_(False)
    elapsed = time.perf_counter() - started - aside
    return SurgeryResult(losses, elapsed / max(1, iterations))
