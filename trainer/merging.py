"""Model merging: one small function per method, registered by name (mergekit-style).

Each method takes the pretrained state dict Θ(0) and the experts' state dicts Θ(1..T) (backbone
only: heads are never merged) and returns the merged state dict. Non-floating tensors (index
buffers) are copied from the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StateDict = dict[str, torch.Tensor]
MERGE_METHODS: dict[str, Callable[..., StateDict]] = {}


def register(name: str):
    def wrap(fn):
        MERGE_METHODS[name] = fn
        return fn

    return wrap


# methods that learn from unlabeled data take a ``context`` (see adamerging.MergeContext)
DATA_DRIVEN = {"adamerging"}


def merge(method: str, base: StateDict, experts: list[StateDict], **hparams) -> StateDict:
    if method not in MERGE_METHODS:
        raise KeyError(
            f"unknown merge method '{method}'; valid: {', '.join(sorted(MERGE_METHODS))}"
        )
    return MERGE_METHODS[method](base, experts, **hparams)


def mergeable(base: StateDict) -> list[str]:
    """Names of the tensors merging acts on (the floating ones)."""
    return [k for k, v in base.items() if v.is_floating_point()]


def task_vectors(base: StateDict, experts: list[StateDict]) -> list[StateDict]:
    """τ_t = Θ(t) − Θ(0) for every floating tensor."""
    keys = mergeable(base)
    return [{k: expert[k] - base[k] for k in keys} for expert in experts]


def _apply(base: StateDict, delta: StateDict) -> StateDict:
    return {k: (v + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}


@register("weight_averaging")
def weight_averaging(base: StateDict, experts: list[StateDict]) -> StateDict:
    """Θ = mean_t Θ(t)."""
    keys = set(mergeable(base))
    return {
        k: torch.stack([e[k] for e in experts]).mean(0) if k in keys else v.clone()
        for k, v in base.items()
    }


@register("task_arithmetic")
def task_arithmetic(base: StateDict, experts: list[StateDict], lam: float = 0.3) -> StateDict:
    """Θ = Θ(0) + λ Σ_t τ_t (Ilharco et al., 2023)."""
    vectors = task_vectors(base, experts)
    return _apply(base, {k: lam * sum(tv[k] for tv in vectors) for k in vectors[0]})


def _trim_threshold(vector: StateDict, k: float) -> torch.Tensor:
    """Magnitude above which an entry is in the top-k% of ONE task vector, over all its tensors."""
    flat = torch.cat([v.reshape(-1).abs().float() for v in vector.values()])
    keep = max(1, int(round(flat.numel() * k / 100.0)))
    # the keep-th largest value == the (n - keep + 1)-th smallest
    return flat.kthvalue(flat.numel() - keep + 1).values


@register("ties_merging")
def ties_merging(
    base: StateDict, experts: list[StateDict], k: float = 20.0, lam: float = 0.3
) -> StateDict:
    """TIES (Yadav et al., 2023): trim each τ_t to its top-k% magnitudes, elect a sign per
    entry by total mass (sign of Σ_t trimmed τ_t), average the entries that agree with it
    (disjoint mean), scale by λ."""
    vectors = task_vectors(base, experts)
    thresholds = [_trim_threshold(tv, k) for tv in vectors]
    delta = {}
    for key in vectors[0]:
        trimmed = torch.stack(
            [
                torch.where(tv[key].abs() >= th, tv[key], torch.zeros_like(tv[key]))
                for tv, th in zip(vectors, thresholds)
            ]
        )
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0).clamp(min=1)
        delta[key] = lam * (trimmed * agree).sum(0) / count
    return _apply(base, delta)


from . import adamerging as _adamerging  # noqa: E402,F401  (registers "adamerging")
