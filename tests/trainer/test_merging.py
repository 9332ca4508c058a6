"""Merge methods on hand-computed tensors, and the registry that validates their parameters."""

import pkgutil
import sys

import pytest
import torch

import trainer.merging as merging
from trainer.config import load_config
from trainer.errors import UserError
from trainer.merging import METHODS, Param, Searched, merge, register, task_vectors, ties

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "idx": torch.tensor([0, 1])}
E1 = {"w": torch.tensor([2.0, 1.0, 0.0, 1.5]), "idx": torch.tensor([5, 5])}
E2 = {"w": torch.tensor([1.0, 3.0, 0.5, 0.0]), "idx": torch.tensor([7, 7])}


def test_registry_has_every_method():
    assert {"weight_averaging", "task_arithmetic", "ties_merging", "adamerging"} <= set(METHODS)


def test_every_module_of_the_package_is_discovered():
    """Adding a method is adding a file: each module (but the registry) is imported."""
    modules = {m.name for m in pkgutil.iter_modules(merging.__path__)} - {"registry"}
    assert modules and all(f"trainer.merging.{m}" in sys.modules for m in modules)
    owners = {METHODS[name].fn.__module__.rsplit(".", 1)[-1] for name in METHODS}
    assert owners <= modules


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
    out = merge("task_arithmetic", BASE, [E1, E2], {"lam": 0.5})
    assert torch.allclose(out["w"], torch.tensor([1.5, 2.0, 0.25, 0.75]))
    default = merge("task_arithmetic", BASE, [E1, E2])
    assert torch.allclose(default["w"], torch.tensor([1.3, 1.6, 0.55, 0.85]))


def test_ties_merging_trim_elect_disjoint_mean():
    # τ1 = [1, 0, -1, .5] top-50% -> [1, 0, -1, 0]; τ2 = [0, 2, -.5, -1] -> [0, 2, 0, -1]
    # elected sign of the sum [1, 2, -1, -1]: [+, +, -, -]; disjoint mean: [1, 2, -1, -1]
    out = merge("ties_merging", BASE, [E1, E2], {"k": 50, "lam": 1.0})
    assert torch.allclose(out["w"], torch.tensor([2.0, 3.0, 0.0, 0.0]))


def test_ties_merging_sign_conflict_keeps_majority_mass():
    base = {"w": torch.zeros(1)}
    experts = [{"w": torch.tensor([3.0])}, {"w": torch.tensor([-1.0])}, {"w": torch.tensor([1.0])}]
    # Σ = 3, sign +; agreeing entries 3 and 1 -> mean 2, × λ 0.5
    out = merge("ties_merging", base, experts, {"k": 100, "lam": 0.5})
    assert torch.allclose(out["w"], torch.tensor([1.0]))


def test_unknown_method():
    with pytest.raises(UserError, match="unknown merge method 'nope'; valid: .*task_arithmetic"):
        merge("nope", BASE, [E1])


def test_parameters_are_checked_against_their_declaration():
    with pytest.raises(UserError, match="merge.task_arithmetic.lam' must be a number"):
        merge("task_arithmetic", BASE, [E1], {"lam": "big"})
    with pytest.raises(UserError, match="merge.ties_merging.k' = 150.0 is out of range"):
        merge("ties_merging", BASE, [E1], {"k": 150})
    with pytest.raises(UserError, match="unknown config key 'merge.task_arithmetic.k'; valid: lam"):
        merge("task_arithmetic", BASE, [E1], {"k": 1})
    with pytest.raises(UserError, match="weight_averaging.lam'; valid: \\(none"):
        merge("weight_averaging", BASE, [E1], {"lam": 1})


def _write_config(tmp_path, merge_section: str):
    path = tmp_path / "c.toml"
    path.write_text(
        'name = "c"\n[[tasks]]\nname = "a"\npath = "x"\n' + merge_section,
        encoding="utf-8",
    )
    return str(path)


def test_config_merge_sections_are_validated_by_the_registry(tmp_path):
    cfg = load_config(
        _write_config(
            tmp_path,
            '[merge]\nmethods = ["ties_merging", "weight_averaging"]\n'
            "[merge.ties_merging]\nk = 10\n",
        )
    )
    # k pinned; λ left out: searched over its declared grid
    assert cfg.merge.hparams("ties_merging") == {"k": 10.0, "lam": Searched(ties.LAMBDA_GRID)}
    assert cfg.merge.hparams("weight_averaging") == {}
    with pytest.raises(UserError, match="unknown config key 'merge.ties_merging.lamda'"):
        load_config(_write_config(tmp_path, "[merge]\nties_merging = { lamda = 1 }\n"))
    with pytest.raises(UserError, match="unknown config key 'merge.tie_merging'; valid: methods"):
        load_config(_write_config(tmp_path, "[merge.tie_merging]\nk = 1\n"))
    with pytest.raises(UserError, match="unknown merge method 'avg'"):
        load_config(_write_config(tmp_path, '[merge]\nmethods = ["avg"]\n'))


def test_a_registered_method_is_usable_from_a_config_with_no_other_edit(tmp_path):
    @register("scaled_mean", params=[Param("scale", float, 1.0, low=0.0, high=2.0)])
    def scaled_mean(base, experts, scale: float = 1.0):
        vectors = task_vectors(base, experts)
        delta = {k: scale * sum(v[k] for v in vectors) / len(vectors) for k in vectors[0]}
        return merging.apply_delta(base, delta)

    try:
        cfg = load_config(
            _write_config(
                tmp_path, '[merge]\nmethods = ["scaled_mean"]\nscaled_mean = {scale = 2}\n'
            )
        )
        out = merge("scaled_mean", BASE, [E1, E2], cfg.merge.hparams("scaled_mean"))
        # mean τ = [.5, 1, -.75, -.25] × 2
        assert torch.allclose(out["w"], torch.tensor([2.0, 3.0, -0.5, 0.5]))
    finally:
        del METHODS["scaled_mean"]
