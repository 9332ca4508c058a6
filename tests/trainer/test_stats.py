"""trainer.results.stats: intervals and paired tests against hand-computed values."""

import math

import numpy as np
import pytest

from trainer.results import stats


def pair(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows' correctness on the same rows, from the 2x2 table's four cells."""
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    return a, b


def test_wilson_hand_computed():
    # 8/10, z = 1.96: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674,
    # half z·sqrt(0.016 + z²/400) / (1 + z²/10) = 0.22658
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.490162, abs=1e-6) and hi == pytest.approx(0.943318, abs=1e-6)
    # at the edges Wilson keeps a width the Wald interval would lose: z²/(n + z²) = 0.27753
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert stats.wilson(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


def test_average_interval_hand_computed():
    z2 = stats.Z95**2
    # one task, 8/10: p̃ = (8 + z²/2) / (10 + z²) = 0.71674 over ñ = 13.8415 rows
    p, m = (8 + z2 / 2) / (10 + z2), 10 + z2
    half = stats.Z95 * math.sqrt(p * (1 - p) / m)
    assert half == pytest.approx(0.237373, abs=1e-6)
    assert stats.average_interval([(8, 10)]) == pytest.approx((0.8 - half, 1.0))  # clipped
    # two tasks: centred on the mean of the accuracies, Var(avg) = Σ p̃(1-p̃)/ñ / T²
    counts = [(900, 1000), (40, 200)]
    adj = [((k + z2 / 2) / (n + z2), n + z2) for k, n in counts]
    half = stats.Z95 * math.sqrt(sum(q * (1 - q) / n for q, n in adj)) / 2
    assert stats.average_interval(counts) == pytest.approx((0.55 - half, 0.55 + half))
    assert stats.average_interval(counts[::-1]) == pytest.approx(stats.average_interval(counts))
    # four tasks at 100 %: still a width, and the average stays inside
    lo, hi = stats.average_interval([(50, 50)] * 4)
    assert 0.95 < lo < 1.0 and hi == 1.0


def test_ci95_of_a_row():
    correct = {
        "a": np.array([1] * 8 + [0] * 2, dtype=bool),
        "b": None,  # no labels
        "c": np.ones(10, dtype=bool),
    }
    out = stats.ci95(correct)
    assert list(out) == ["a", "b", "c", "avg"]
    assert out["a"] == [0.490162, 0.943318] and out["b"] is None
    assert out["c"] == [0.722467, 1.0]
    expected = stats.average_interval([(8, 10), (10, 10)])
    assert out["avg"] == pytest.approx(list(expected), abs=1e-6)
    assert out["avg"][0] < 0.9 < out["avg"][1]  # the average of 0.8 and 1.0
    assert stats.ci95({"a": None})["avg"] is None


def test_mcnemar_exact_small_tables():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)  # 0.0625
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 0.021484
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    # C(20, ≤5) = 1 + 20 + 190 + 1140 + 4845 + 15504 = 21700
    assert stats.mcnemar_exact(5, 15) == pytest.approx(2 * 21700 / 2**20)
    assert 0 < stats.mcnemar_exact(4000, 4300) < 0.05  # large n: log-space, no overflow


def test_compare_one_task_uses_exact_mcnemar():
    a, b = pair(both=80, a_only=9, b_only=1, neither=10)
    c = stats.compare({"t": a}, {"t": b}, "surgered", "individual")
    assert c.test == "exact McNemar"
    assert c.p_value == pytest.approx(2 * 11 / 2**10)
    assert c.difference == pytest.approx(0.08) and c.verdict == "beats"
    assert c.per_task["t"]["a_only"] == 9 and c.per_task["t"]["b_only"] == 1
    assert c.sentence().startswith("beats individual (+8.0 points, p = 0.021")
    back = stats.compare({"t": b}, {"t": a})
    assert back.verdict == "below" and back.p_value == pytest.approx(c.p_value)
    same = stats.compare({"t": a}, {"t": a})
    assert same.verdict == "ties within noise" and same.p_value == 1.0
    assert same.difference_ci95 == [0.0, 0.0]


def test_compare_stratified_average_hand_computed():
    a1, b1 = pair(both=70, a_only=10, b_only=2, neither=18)  # n 100: d 0.08
    a2, b2 = pair(both=30, a_only=1, b_only=3, neither=16)  # n 50: d -0.04
    c = stats.compare({"x": a1, "y": a2}, {"x": b1, "y": b2})
    # d = (0.08 - 0.04) / 2; Var = [(0.12 - 0.0064)/100 + (0.08 - 0.0016)/50] / 4
    sd = math.sqrt(0.001136 + 0.001568) / 2
    assert c.difference == pytest.approx(0.02) and sd == pytest.approx(0.026)
    assert c.p_value == pytest.approx(math.erfc(0.02 / sd / math.sqrt(2)))
    assert c.verdict == "ties within noise"
    assert c.difference_ci95 == pytest.approx([0.02 - 1.96 * 0.026, 0.02 + 1.96 * 0.026], abs=1e-4)
    assert c.per_task["x"]["verdict"] == "beats"  # 10 vs 2 alone: p = 0.0386
    assert c.per_task["x"]["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 2**12, rel=1e-3)
    data = c.to_json()
    assert data["verdict"] in stats.VERDICTS and data["alpha"] == 0.05


def test_compare_refuses_different_rows():
    with pytest.raises(ValueError, match="same rows"):
        stats.compare({"t": np.ones(5, bool)}, {"t": np.ones(6, bool)})
    with pytest.raises(ValueError, match="no task"):
        stats.compare({"t": None}, {"t": None})


def _rows(seed: int):
    rng = np.random.default_rng(seed)
    individual = {"a": rng.random(400) < 0.9, "b": rng.random(250) < 0.6}
    merged = {"a": rng.random(400) < 0.8, "b": rng.random(250) < 0.45}
    surgered = {k: np.where(rng.random(v.size) < 0.7, v, merged[k]) for k, v in individual.items()}
    return surgered, merged, individual


def test_gap_closure_value_interval_and_determinism():
    surgered, merged, individual = _rows(0)
    avg = {name: np.mean([r[t].mean() for t in r]) for name, r in zip("smi", _rows(0))}
    g = stats.gap_closure(surgered, merged, individual, seed=3)
    assert g.value == pytest.approx((avg["s"] - avg["m"]) / (avg["i"] - avg["m"]))
    assert g.ci95[0] < g.value < g.ci95[1]
    assert stats.gap_closure(surgered, merged, individual, seed=3) == g  # seeded: bit for bit
    assert stats.gap_closure(surgered, merged, individual, seed=4).ci95 != g.ci95
    data = g.to_json()
    assert data["seed"] == 3 and data["resamples"] == stats.BOOTSTRAP_RESAMPLES


def test_gap_closure_is_paired():
    """Surgery that reproduces the experts row for row closes exactly 100 % in every
    resample (an unpaired bootstrap would give a wide interval); one that changes nothing, 0."""
    _, merged, individual = _rows(1)
    assert stats.gap_closure(individual, merged, individual).ci95 == [1.0, 1.0]
    assert stats.gap_closure(merged, merged, individual).ci95 == [0.0, 0.0]


def test_gap_closure_without_a_gap():
    _, merged, _ = _rows(2)
    g = stats.gap_closure(merged, merged, merged)
    assert g.value is None and g.ci95 is None and "no gap" in g.note
    # a gap of 1 row in 650: not distinguishable from zero, so no interval
    individual = {k: v.copy() for k, v in merged.items()}
    individual["a"][np.flatnonzero(~individual["a"])[0]] = True
    g = stats.gap_closure(merged, merged, individual)
    assert g.value == 0.0 and g.ci95 is None and "not above" in g.note
