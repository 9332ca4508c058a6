"""AdaMerging, layer-wise (Yang et al., 2024): one coefficient per task and per tensor.

    Θ_k = Θ_k(0) + Σ_t λ_{t,k} τ_{t,k}        λ clamped to [0, 1]

λ is learned by Adam (lr 3e-3; the paper: 1e-3) on every task's head's prediction entropy
over that task's unlabeled inputs. The backbone runs through ``torch.func.functional_call``
on the merged tensors, so gradients reach λ without copying the model.

What keeps it from collapsing (measured: docs/RESULTS.md, "Why AdaMerging collapsed"): a
head's entropy is no measure of its accuracy when the merge starts poor or the tasks fight
over shared tensors, and it is lowest when every input goes to one class. So, with
``guard_size`` unlabeled inputs per task held out of training and each expert's predictions
on them (no labels anywhere):

- ``init_search``: λ starts at the task-arithmetic value of INIT_GRID whose merge agrees most
  with the experts on the held-out inputs (the paper's 0.3 left a demo task at 34 %, 89 % of
  its predictions in one class, and entropy minimisation drove it the rest of the way);
- ``diversity``: the loss adds KL(the batch's mean prediction ‖ the class proportions the
  expert predicts), so "every input to one class" stops being a minimum;
- ``normalize_logits``: each task's logits are divided by their spread at the start, so the
  loss does not depend on a head's scale (a head with CLIP's logit scale 100 folded in has an
  entropy of ~0 and almost no gradient otherwise);
- the guard: every ``guard_every`` iterations each task's agreement with its expert on the
  held-out inputs; training stops when a task falls more than ``guard_margin`` below its
  start, and the checkpoint with the best mean agreement is returned.

``init_search = false, diversity = 0, normalize_logits = false, guard_every = 0`` is the
paper's recipe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call

from ..progress import progress
from .registry import MergeContext, Param, StateDict, mergeable, register, task_vectors

log = logging.getLogger("deepsurgery")

# the starting coefficients ``init_search`` tries (task arithmetic's λ, all tasks and tensors)
INIT_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _merged(
    base: StateDict, vectors: list[StateDict], keys: list[str], lam: torch.Tensor
) -> StateDict:
    """Θ(0) + Σ_t clamp(λ[t, k], 0, 1) τ_t for every tensor k (λ [T, K])."""
    coeff = lam.clamp(0.0, 1.0)
    return {
        k: base[k] + sum(coeff[t, i] * vectors[t][k] for t in range(len(vectors)))
        for i, k in enumerate(keys)
    }


def information_loss(
    logits: torch.Tensor, diversity: float = 0.0, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean entropy of the rows' predictions (logits [B, C]: AdaMerging's loss) plus
    ``diversity`` × KL(mean prediction ‖ ``prior`` [C], uniform if None). The second term is
    zero when the batch's predictions spread over the classes as the prior does, so "every
    input to one class" stops being a minimum."""
    probs = logits.softmax(-1)
    loss = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    if diversity:
        mean = probs.mean(0)
        if prior is None:
            prior = torch.full_like(mean, 1.0 / len(mean))
        loss = loss + diversity * (mean * (mean.clamp_min(1e-12) / prior).log()).sum()
    return loss


def class_prior(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class proportions of ``predictions`` [N] (class ids), add-one smoothed: no class the
    held-out slice happens to miss gets probability 0 [C]."""
    counts = torch.bincount(predictions, minlength=num_classes).float()
    return (counts + 1) / (counts.sum() + num_classes)


def _logits(
    backbone: torch.nn.Module,
    heads: torch.nn.Module,
    params: StateDict,
    inputs: list,
    t: int,
    device: torch.device,
) -> torch.Tensor:
    """Task ``t``'s head on the backbone holding ``params``: logits [len(inputs), C_t]."""
    features = functional_call(backbone, params, (backbone.batch(inputs, device),), strict=False)
    task_ids = torch.full((len(inputs),), t, dtype=torch.long, device=device)
    return heads(features, task_ids)[:, : heads.num_classes[t]]


def _held_out(
    unlabeled: list, size: int, rng: np.random.Generator
) -> tuple[list[list], list[list]]:
    """Per task: (entropy pool, guard inputs); at most ``size`` and half a task's inputs are
    held out."""
    pools, held = [], []
    for inputs in unlabeled:
        order = rng.permutation(len(inputs))
        k = min(size, len(inputs) // 2)
        held.append([inputs[i] for i in order[:k]])
        pools.append([inputs[i] for i in order[k:]])
    return pools, held


@register(
    "adamerging",
    params=[
        Param("iterations", int, 100, low=0, help="Adam steps, each on a batch of every task"),
        # 3e-3 (the paper: 1e-3), chosen on validation: +1.1 points on dinov2-bench, a tie
        # on text-bench and the demo (where the guard stops either within 15 steps)
        Param("lr", float, 3e-3, low=0.0, help="Adam learning rate of the coefficients"),
        Param("batch_size", int, 16, low=1, help="unlabeled inputs per task per step"),
        Param("init", float, 0.3, low=0.0, high=1.0, help="initial coefficient"),
        Param(
            "init_search",
            bool,
            True,
            help="start from the λ of INIT_GRID whose merge agrees most with the experts",
        ),
        Param(
            "diversity",
            float,
            1.0,
            low=0.0,
            help="weight of the batch's mean-prediction entropy, subtracted (0: entropy only)",
        ),
        Param(
            "normalize_logits",
            bool,
            True,
            help="divide each task's logits by their spread at the start (scale-free loss)",
        ),
        Param(
            "guard_every",
            int,
            5,
            low=0,
            help="check every task's agreement with its expert every N steps (0: no guard)",
        ),
        Param(
            "guard_size",
            int,
            64,
            low=1,
            help="unlabeled inputs per task held out of training (the guard's, the prior's)",
        ),
        Param(
            "guard_margin",
            float,
            0.03,
            low=0.0,
            high=1.0,
            help="stop when a task's agreement falls this far below its value at the start",
        ),
    ],
    needs_data=True,
)
def adamerging(
    base: StateDict,
    experts: list[StateDict],
    *,
    context: MergeContext,
    iterations: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    init: float = 0.3,
    init_search: bool = True,
    diversity: float = 1.0,
    normalize_logits: bool = True,
    guard_every: int = 5,
    guard_size: int = 64,
    guard_margin: float = 0.03,
    callback: Callable[[int, StateDict], None] | None = None,
) -> StateDict:
    """The merged state; ``context.extra["adamerging"]`` records what the guard saw.
    ``callback(iteration, state)`` sees the merged state at every guard check (iteration 0
    and every ``guard_every``; ``bench.adamerging_curve`` scores it)."""
    device = context.device
    keys = mergeable(base)
    dev_base = {k: base[k].to(device) for k in keys}
    vectors = [{k: v.to(device) for k, v in tv.items()} for tv in task_vectors(base, experts)]
    backbone, heads = context.backbone.to(device).eval(), context.heads.to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(context.seed)
    pools, held = _held_out(context.unlabeled, guard_size, rng)
    tasks = range(len(pools))

    # what each expert predicts on its task's held-out inputs: the guard's reference, the
    # class prior and the starting point's score
    expert_pred: list[torch.Tensor | None] = []
    prior: list[torch.Tensor | None] = []
    with torch.no_grad():
        for t in tasks:
            if not held[t]:  # too few inputs to hold any out: unguarded, uniform prior
                expert_pred.append(None)
                prior.append(None)
                continue
            expert = {k: v.to(device) for k, v in experts[t].items()}
            expert_pred.append(_logits(backbone, heads, expert, held[t], t, device).argmax(-1))
            prior.append(class_prior(expert_pred[t], heads.num_classes[t]))
            del expert
    checked = [t for t in tasks if expert_pred[t] is not None]

    def agreement(params: StateDict) -> list[float | None]:
        """Per task: the share of held-out inputs the merged model classes as the expert."""
        with torch.no_grad():
            return [
                None
                if expert_pred[t] is None
                else (_logits(backbone, heads, params, held[t], t, device).argmax(-1))
                .eq(expert_pred[t])
                .float()
                .mean()
                .item()
                for t in tasks
            ]

    def mean_agreement(params: StateDict) -> float:
        scores = agreement(params)
        return float(np.mean([scores[t] for t in checked]))

    def uniform(value: float) -> torch.Tensor:
        return torch.full((len(experts), len(keys)), float(value), device=device)

    record: dict = {"history": []}
    if init_search and checked:  # task arithmetic at each λ of the grid, scored without labels
        grid = sorted({*INIT_GRID, init})
        scores = {c: mean_agreement(_merged(dev_base, vectors, keys, uniform(c))) for c in grid}
        chosen = max(scores, key=lambda c: (scores[c], -abs(c - init)))  # ties: nearest init
        log.info(
            "adamerging: starting from λ = %g, whose task arithmetic merge agrees with the "
            "experts on %.1f%% of the held-out inputs (%g: %.1f%%; grid %g..%g)",
            chosen,
            100 * scores[chosen],
            init,
            100 * scores[init],
            grid[0],
            grid[-1],
        )
        record["init_agreement"] = scores
        init = chosen
    record["init"] = init
    lam = uniform(init).requires_grad_(True)
    optimizer = torch.optim.Adam([lam], lr=lr)
    guarded = guard_every > 0 and bool(checked)

    # the spread of each task's logits at the start (the loss's temperature)
    with torch.no_grad():
        start = _merged(dev_base, vectors, keys, lam)
        spread = [
            _logits(backbone, heads, start, held[t] or pools[t][:batch_size], t, device)
            .std(-1)
            .mean()
            .clamp_min(1e-6)
            if normalize_logits
            else 1.0
            for t in tasks
        ]

    def full(params: StateDict) -> StateDict:
        return {**base, **{k: v.detach().cpu() for k, v in params.items()}}

    if guarded:
        if callback is not None:
            callback(0, full(start))
        first = agreement(start)
        best = (float(np.mean([first[t] for t in checked])), 0, lam.detach().clone())
        record.update(start=first, history=[(0, first)])
    stopped = None

    bar = progress(range(1, iterations + 1), "adamerging", "it")
    for it in bar:
        params = _merged(dev_base, vectors, keys, lam)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for t in tasks:
            rows = rng.choice(len(pools[t]), size=min(batch_size, len(pools[t])), replace=False)
            logits = _logits(backbone, heads, params, [pools[t][i] for i in rows], t, device)
            loss = information_loss(logits / spread[t], diversity, prior[t])
            # retain the merged-parameter graph for the next task's backward
            loss.backward(retain_graph=t < len(pools) - 1)
            total += loss.item()
        optimizer.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        postfix = {"loss": f"{total / len(pools):.4f}"}
        if guarded and (it % guard_every == 0 or it == iterations):
            with torch.no_grad():
                params = _merged(dev_base, vectors, keys, lam)
            if callback is not None:
                callback(it, full(params))
            now = agreement(params)
            record["history"].append((it, now))
            mean = float(np.mean([now[t] for t in checked]))
            postfix["agree"] = f"{100 * mean:.1f}%"
            fallen = [t for t in checked if now[t] < first[t] - guard_margin]
            if fallen:
                t = min(fallen, key=lambda t: now[t] - first[t])
                stopped = it
                log.info(
                    "adamerging guard: stopped at iteration %d: task %s agrees with its expert "
                    "on %.1f%% of %d held-out inputs, %.1f points below %.1f%% at the start "
                    "(margin %.1f)",
                    it,
                    context.names[t] if context.names else t,
                    100 * now[t],
                    len(held[t]),
                    100 * (first[t] - now[t]),
                    100 * first[t],
                    100 * guard_margin,
                )
                break
            if mean >= best[0]:
                best = (mean, it, lam.detach().clone())
        bar.set_postfix(**postfix)
    bar.close()

    if guarded:
        last = stopped if stopped is not None else iterations
        kept = best[1]
        if kept != last:
            log.info(
                "adamerging guard: kept the coefficients of iteration %d (mean agreement with "
                "the experts %.1f%%, %.1f%% at the start) instead of iteration %d's",
                kept,
                100 * best[0],
                100 * np.mean([first[t] for t in checked]),
                last,
            )
        lam = best[2]
        record.update(kept=kept, stopped=stopped, agreement=best[0])
    record["coefficients"] = lam.detach().clamp(0.0, 1.0).cpu()  # [T, K], K = ``keys``
    context.extra["adamerging"] = record
    with torch.no_grad():
        merged = _merged(dev_base, vectors, keys, lam)
    out = {k: v.clone() for k, v in base.items()}
    out.update({k: v.detach().cpu() for k, v in merged.items()})
    return out
