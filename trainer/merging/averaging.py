"""Weight averaging and Task Arithmetic (Ilharco et al., 2023)."""

from __future__ import annotations

import torch

from .registry import Param, StateDict, apply_delta, mergeable, register, task_vectors


@register("weight_averaging")
def weight_averaging(base: StateDict, experts: list[StateDict]) -> StateDict:
    """Θ = mean_t Θ(t)."""
    keys = set(mergeable(base))
    return {
        k: torch.stack([e[k] for e in experts]).mean(0) if k in keys else v.clone()
        for k, v in base.items()
    }


# the Task Arithmetic paper's grid: λ in {0.05, 0.10, ..., 1.0}
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))


@register(
    "task_arithmetic",
    params=[
        Param(
            "lam",
            float,
            0.3,
            low=0.0,
            high=10.0,
            help="scaling of the summed vectors",
            grid=LAMBDA_GRID,
        )
    ],
    scale="lam",
)
def task_arithmetic(base: StateDict, experts: list[StateDict], lam: float = 0.3) -> StateDict:
    """Θ = Θ(0) + λ Σ_t τ_t."""
    vectors = task_vectors(base, experts)
    return apply_delta(base, {k: lam * sum(tv[k] for tv in vectors) for k in vectors[0]})
