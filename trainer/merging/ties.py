"""Ties-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

import torch

from .registry import Param, StateDict, apply_delta, register, task_vectors


def _trim_threshold(vector: StateDict, k: float) -> torch.Tensor:
    """Magnitude above which an entry is in the top-k% of ONE task vector, over all its tensors."""
    flat = torch.cat([v.reshape(-1).abs().float() for v in vector.values()])
    keep = max(1, int(round(flat.numel() * k / 100.0)))
    # the keep-th largest value == the (n - keep + 1)-th smallest
    return flat.kthvalue(flat.numel() - keep + 1).values


# k: the Ties paper's range (top 10-30 % of each task vector; 20 is its default). λ scales a
# disjoint MEAN (about one task vector's magnitude, where Task Arithmetic scales a sum of T),
# so its grid reaches 2.0: the Ties authors search 0.8..2.5, SurgeryV2's code uses 0.3.
K_GRID = (10.0, 20.0, 30.0)
LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 21))


@register(
    "ties_merging",
    params=[
        Param(
            "k", float, 20.0, low=0.0, high=100.0, help="% of each task vector kept", grid=K_GRID
        ),
        Param(
            "lam",
            float,
            0.3,
            low=0.0,
            high=10.0,
            help="scaling of the merged vector",
            grid=LAMBDA_GRID,
        ),
    ],
    scale="lam",
)
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
    return apply_delta(base, delta)
