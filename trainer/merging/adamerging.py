"""AdaMerging, layer-wise (Yang et al., 2024): one coefficient per task and per tensor.

    Θ_k = Θ_k(0) + Σ_t λ_{t,k} τ_{t,k}        λ initialised at 0.3, clamped to [0, 1]

λ is learned by minimising the mean entropy of every task's head on that task's unlabeled
inputs (Adam). The backbone runs through ``torch.func.functional_call`` on the merged tensors,
so gradients reach λ without copying the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from ..progress import progress
from .registry import MergeContext, Param, StateDict, mergeable, register, task_vectors


def _merged(
    base: StateDict, vectors: list[StateDict], keys: list[str], lam: torch.Tensor
) -> StateDict:
    coeff = lam.clamp(0.0, 1.0)
    return {
        k: base[k] + sum(coeff[t, i] * vectors[t][k] for t in range(len(vectors)))
        for i, k in enumerate(keys)
    }


@register(
    "adamerging",
    params=[
        Param("iterations", int, 100, low=0, help="entropy-minimisation steps"),
        Param("lr", float, 1e-3, low=0.0, help="Adam learning rate of the coefficients"),
        Param("batch_size", int, 16, low=1, help="unlabeled inputs per task per step"),
        Param("init", float, 0.3, low=0.0, high=1.0, help="initial coefficient"),
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
) -> StateDict:
    device = context.device
    keys = mergeable(base)
    dev_base = {k: base[k].to(device) for k in keys}
    vectors = [{k: v.to(device) for k, v in tv.items()} for tv in task_vectors(base, experts)]
    lam = torch.full((len(experts), len(keys)), float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=lr)
    backbone, heads = context.backbone.to(device).eval(), context.heads.to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(context.seed)
    bar = progress(range(iterations), "adamerging", "it")
    for _ in bar:
        params = _merged(dev_base, vectors, keys, lam)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for t, inputs in enumerate(context.unlabeled):
            rows = rng.choice(len(inputs), size=min(batch_size, len(inputs)), replace=False)
            batch = backbone.batch([inputs[i] for i in rows], device)
            features = functional_call(backbone, params, (batch,), strict=False)
            task_ids = torch.full((len(rows),), t, dtype=torch.long, device=device)
            logits = heads(features, task_ids)[:, : heads.num_classes[t]]
            probs = logits.softmax(-1)
            entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
            # retain the merged-parameter graph for the next task's backward
            entropy.backward(retain_graph=t < len(context.unlabeled) - 1)
            total += entropy.item()
        optimizer.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        bar.set_postfix(entropy=f"{total / len(context.unlabeled):.4f}")
    bar.close()
    with torch.no_grad():
        merged = _merged(dev_base, vectors, keys, lam)
    out = {k: v.clone() for k, v in base.items()}
    out.update({k: v.detach().cpu() for k, v in merged.items()})
    return out
