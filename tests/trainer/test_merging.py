"""Merge methods on hand-computed tensors."""

import pytest
import torch

from trainer.merging import MERGE_METHODS, merge, task_vectors

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "idx": torch.tensor([0, 1])}
E1 = {"w": torch.tensor([2.0, 1.0, 0.0, 1.5]), "idx": torch.tensor([5, 5])}
E2 = {"w": torch.tensor([1.0, 3.0, 0.5, 0.0]), "idx": torch.tensor([7, 7])}


def test_registry_has_every_method():
    assert {"weight_averaging", "task_arithmetic", "ties_merging", "adamerging"} <= set(
        MERGE_METHODS
    )


def test_task_vectors_skip_integer_buffers():
    tv = task_vectors(BASE, [E1, E2])
    assert torch.equal(tv[0]["w"], torch.tensor([1.0, 0.0, -1.0, 0.5]))
    assert "idx" not in tv[0]


def test_weight_averaging():
    out = merge("weight_averaging", BASE, [E1, E2])
    assert torch.equal(out["w"], torch.tensor([1.5, 2.0, 0.25, 0.75]))
    assert torch.equal(out["idx"], BASE["idx"])  # integer buffers come from the base


def test_task_arithmetic():
    # τ1 = [1, 0, -1, .5], τ2 = [0, 2, -.5, -1]; Σ = [1, 2, -1.5, -.5]
    out = merge("task_arithmetic", BASE, [E1, E2], lam=0.5)
    assert torch.allclose(out["w"], torch.tensor([1.5, 2.0, 0.25, 0.75]))
    default = merge("task_arithmetic", BASE, [E1, E2])
    assert torch.allclose(default["w"], torch.tensor([1.3, 1.6, 0.55, 0.85]))


def test_ties_merging_trim_elect_disjoint_mean():
    # τ1 = [1, 0, -1, .5] top-50% -> [1, 0, -1, 0]; τ2 = [0, 2, -.5, -1] -> [0, 2, 0, -1]
    # elected sign of the sum [1, 2, -1, -1]: [+, +, -, -]; disjoint mean: [1, 2, -1, -1]
    out = merge("ties_merging", BASE, [E1, E2], k=50, lam=1.0)
    assert torch.allclose(out["w"], torch.tensor([2.0, 3.0, 0.0, 0.0]))


def test_ties_merging_sign_conflict_keeps_majority_mass():
    base = {"w": torch.zeros(1)}
    experts = [{"w": torch.tensor([3.0])}, {"w": torch.tensor([-1.0])}, {"w": torch.tensor([1.0])}]
    # Σ = 3, sign +; agreeing entries 3 and 1 -> mean 2, × λ 0.5
    out = merge("ties_merging", base, experts, k=100, lam=0.5)
    assert torch.allclose(out["w"], torch.tensor([1.0]))


def test_unknown_method():
    with pytest.raises(KeyError, match="valid"):
        merge("nope", BASE, [E1])
