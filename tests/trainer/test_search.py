"""The merge hyper-parameter search: coarse-to-fine against the exhaustive grid on synthetic
validation landscapes (one peak, a plateau, binomial noise) and on a tiny real merge; the
winning merge kept as scored; what results.json records."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.merging import METHODS, Param, Searched, merge, register
from trainer.merging.averaging import LAMBDA_GRID as TA_GRID
from trainer.merging.search import COARSE_TO_FINE, GRID, search
from trainer.merging.ties import K_GRID
from trainer.merging.ties import LAMBDA_GRID as TIES_GRID
from trainer.pipeline import prepare
from trainer.results.report import search_line
from trainer.results.stats import average_interval

# one expert whose task vector is [1, 0]: task arithmetic's w[0] IS λ
BASE = {"w": torch.zeros(2), "idx": torch.tensor([1, 2])}
EXPERTS = [{"w": torch.tensor([1.0, 0.0]), "idx": torch.tensor([9, 9])}]
TA = {"lam": Searched(TA_GRID)}
TIES = {"k": Searched(K_GRID), "lam": Searched(TIES_GRID)}
ROWS, TASKS = 200, 4  # validation rows per task, tasks: the noisy landscapes' sample


@pytest.fixture
def probe(monkeypatch):
    """A method shaped like Ties-Merging (k and a scale λ on Ties' grids) whose merge writes
    its parameters into the state, Θ = Θ(0) + λ·[1, k], so a score can read them back."""
    monkeypatch.delitem(METHODS, "probe", raising=False)

    @register(
        "probe",
        params=[
            Param("k", float, 20.0, grid=K_GRID),
            Param("lam", float, 1.0, grid=TIES_GRID),
        ],
        scale="lam",
    )
    def probe_merge(base, experts, k=20.0, lam=1.0):
        return {"w": base["w"] + lam * torch.tensor([1.0, k]), "idx": base["idx"].clone()}

    yield "probe"
    del METHODS["probe"]


def _read(state) -> tuple[float, float]:
    """(λ, k) of a probe (or task arithmetic: k = 0) state."""
    lam = float(state["w"][0])
    return lam, (float(round(float(state["w"][1]) / lam)) if lam else 0.0)  # float32


def _both(name, hparams, score):
    grid = search(name, BASE, EXPERTS, hparams, score, strategy=GRID)
    fast = search(name, BASE, EXPERTS, hparams, score)
    assert grid.strategy == GRID and grid.evaluated == grid.grid_size == len(grid.candidates)
    assert fast.strategy == COARSE_TO_FINE and fast.evaluated == len(fast.candidates)
    return grid, fast


@pytest.mark.parametrize("peak", [0.0, 0.05, 0.23, 0.5, 0.62, 0.85, 1.0, 1.4])
def test_one_peak_the_grids_choice_in_at_most_ten(peak):
    def score(state):
        lam, _ = _read(state)
        return -((lam - peak) ** 2), [0.0]

    grid, fast = _both("task_arithmetic", TA, score)
    assert fast.chosen == grid.chosen and fast.score == grid.score
    assert fast.evaluated <= 10 and grid.evaluated == 20


@pytest.mark.parametrize("top", [(0.3, 0.6), (0.05, 0.2), (0.7, 1.0), (0.45, 0.5)])
def test_a_plateau_gives_the_grids_first_best(top):
    """Equal scores over a range of λ: the grid keeps the first; so does coarse-to-fine."""
    low, high = top

    def score(state):
        lam, _ = _read(state)
        return -max(0.0, low - lam - 1e-6, lam - high - 1e-6), [0.0]  # λ is float32

    grid, fast = _both("task_arithmetic", TA, score)
    assert grid.chosen["lam"] == pytest.approx(low)
    assert fast.chosen == grid.chosen and fast.evaluated <= 10


@pytest.mark.parametrize("best_k", K_GRID)
@pytest.mark.parametrize("peak", [0.1, 0.75, 1.33, 2.0])
def test_ties_grid_of_sixty_in_at_most_twenty(probe, best_k, peak):
    def score(state):
        lam, k = _read(state)
        return -((lam - peak) ** 2) - 0.1 * abs(k - best_k), [0.0]

    grid, fast = _both(probe, TIES, score)
    assert grid.grid_size == 60 and fast.evaluated <= 20
    assert fast.chosen == grid.chosen and fast.chosen["k"] == best_k


def _noisy(seed: int, two_d: bool, jitter: float = 0.05):
    """A validation average as measured: per task a smooth accuracy curve in λ (peaks at
    different λ, one k better than the others) read on the SAME ROWS for every candidate, as
    a real search does: row r is right when its fixed difficulty u_r < p(λ, k) + ε, with ε a
    per-candidate, per-row jitter (N(0, ``jitter``)). -> score(state): (mean, per task)."""
    rng = np.random.default_rng(seed)
    peaks = rng.uniform(0.2, 1.6 if two_d else 0.9, TASKS)
    widths = rng.uniform(0.3, 1.0, TASKS)
    levels = rng.uniform(0.6, 0.9, TASKS)
    k_gain = dict(zip(K_GRID, rng.uniform(-0.03, 0.03, len(K_GRID))))
    difficulty = rng.uniform(0.0, 1.0, (TASKS, ROWS))

    def score(state):
        lam, k = _read(state)
        p = levels * np.exp(-(((lam - peaks) / widths) ** 2)) + (k_gain[k] if two_d else 0.0)
        local = np.random.default_rng([seed, round(lam * 100), round(k)])
        right = difficulty < p[:, None] + local.normal(0.0, jitter, (TASKS, ROWS))
        per_task = right.mean(1)
        return float(per_task.mean()), [float(v) for v in per_task]

    return score


def _error_bar(result) -> tuple[float, float]:
    """The 95 % interval of a candidate's validation average (its per-task counts)."""
    return average_interval([(round(p * ROWS), ROWS) for p in result.per_task])


@pytest.mark.parametrize("two_d", [False, True], ids=["task_arithmetic", "ties"])
def test_noisy_validation_within_the_grid_winners_error_bar(probe, two_d):
    """On 40 noisy landscapes each: the fast choice is the grid's, or scores within the grid
    winner's 95 % interval; never more candidates than allowed."""
    same = 0
    for seed in range(40):
        name, hparams = (probe, TIES) if two_d else ("task_arithmetic", TA)
        grid, fast = _both(name, hparams, _noisy(seed, two_d))
        assert fast.evaluated <= (20 if two_d else 10)
        low, _ = _error_bar(grid)
        assert fast.score >= low, (seed, grid.chosen, fast.chosen)
        same += fast.chosen == grid.chosen
    assert same >= 20  # mostly the very same choice, not merely one within noise


def test_the_winning_merge_is_kept_as_scored():
    states = []

    def score(state):
        states.append(state)
        lam, _ = _read(state)
        return -abs(lam - 0.35), [0.0]

    result = search("task_arithmetic", BASE, EXPERTS, TA, score)
    assert result.chosen == {"lam": 0.35}
    direct = merge("task_arithmetic", BASE, EXPERTS, {"lam": 0.35})
    torch.testing.assert_close(result.state["w"], direct["w"])
    scored = next(s for s in states if float(s["w"][0]) == pytest.approx(0.35))
    assert torch.equal(result.state["w"], scored["w"])  # the very tensors that were scored
    assert torch.equal(result.state["idx"], BASE["idx"]) and result.state["idx"] is not BASE["idx"]


def test_results_json_record(probe):
    result = search(probe, BASE, EXPERTS, TIES, lambda s: (-abs(_read(s)[0] - 0.7), [0.0]))
    record = result.to_json()
    assert "state" not in record and result.state is not None
    assert record["strategy"] == COARSE_TO_FINE and record["evaluated"] == len(record["candidates"])
    assert record["grid"] == {"lam": list(TIES_GRID), "k": list(K_GRID)}
    assert {"chosen", "searched", "pinned", "candidates", "score", "per_task"} <= set(record)
    json.dumps(record)
    assert result.counted() == f"{result.evaluated} of 60 candidates (coarse-to-fine)"
    small = search(probe, BASE, EXPERTS, {"k": 20.0, "lam": Searched((0.5, 1.0, 1.5))}, _peak)
    assert small.strategy == GRID and small.evaluated == 3  # too small to gain: searched whole
    assert small.counted() == "3 candidates"
    with pytest.raises(ValueError, match="strategy"):
        search(probe, BASE, EXPERTS, TIES, _peak, strategy="golden")


def _peak(state):
    return -abs(_read(state)[0] - 1.0), [0.0]


def test_a_method_without_a_scale_walks_its_last_parameter(monkeypatch):
    """No ``scale``: every candidate is a merge of its own; the walk runs on the last one."""
    method = dataclasses.replace(METHODS["task_arithmetic"], scale=None)
    monkeypatch.setitem(METHODS, "task_arithmetic", method)
    calls = []

    def score(state):
        calls.append(state)
        return -abs(_read(state)[0] - 0.8), [0.0]

    result = search("task_arithmetic", BASE, EXPERTS, TA, score)
    assert result.chosen == {"lam": 0.8} and len(calls) == result.evaluated <= 10


def test_on_a_tiny_real_merge_the_same_choice_as_the_grid(tiny_config, text_tasks, tmp_path):
    """Two experts fine-tuned here, 12 validation rows per task: both strategies choose the
    same λ (and k) on the real validation score; the pipeline's merged state is the kept one."""
    config = load_config(str(tiny_config), ["validation.size=12", "surgery.unlabeled='test'"])
    exp = prepare(
        config, data_root=text_tasks, cache=tmp_path / "cache", device=torch.device("cpu")
    )
    experts = [e.state for e in exp.experts]
    for method in ("task_arithmetic", "ties_merging"):
        hparams = config.merge.hparams(method)
        grid = search(method, exp.base_state, experts, hparams, exp.scorer(), strategy=GRID)
        fast = search(method, exp.base_state, experts, hparams, exp.scorer())
        assert fast.chosen == grid.chosen and fast.score == grid.score
        assert fast.evaluated < grid.evaluated
    state, hparams = exp.merged("task_arithmetic")
    result = exp.searches["task_arithmetic"]
    assert result.state is None  # handed to the caller, not held twice
    assert hparams == result.chosen and exp.scorer()(state)[0] == result.score
    line = search_line(result, exp.validation, [])
    assert f"{result.evaluated} of 20 candidates (coarse-to-fine)" in line
