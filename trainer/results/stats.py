"""Error bars and paired tests for accuracies measured on a finite test split.

Every number here is computed from per-row correctness (bool [N] per task): the rows a table
compares were scored on the SAME inputs, so two rows' errors are correlated and a comparison
must be paired (McNemar), not two independent intervals overlapping or not. numpy and the
standard library only: every formula is exact or a seeded resampling, so results.json is
reproducible bit for bit.

- :func:`wilson`: the 95 % Wilson score interval of one task's accuracy (good coverage even
  at 0 % / 100 % or a few dozen rows, where the normal "Wald" interval collapses).
- :func:`average_interval`: the interval of the unweighted mean of per-task accuracies.
- :func:`gap_closure`: ``(merged+surgery − merged) / (individual − merged)`` with a 95 %
  interval by a seeded paired bootstrap over test rows.
- :func:`compare`: row A vs row B on the same rows: exact McNemar per task and a stratified
  paired test of the average, with a verdict word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
VERDICTS = ("beats", "below", "ties within noise")

Correct = Mapping[str, np.ndarray | None]  # per task: bool [N_t] (None: no labels)


def _counts(correct: np.ndarray) -> tuple[int, int]:
    c = np.asarray(correct, dtype=bool)
    return int(c.sum()), int(c.size)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (Wilson 1927):
    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} must lie in 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def average_interval(counts: Sequence[tuple[int, int]], z: float = Z95) -> tuple[float, float]:
    """The 95 % interval of the unweighted mean over tasks of ``k_t / n_t`` (the table's Avg).

    The tasks' test rows are independent samples, so Var(avg) = Σ_t p_t(1−p_t)/n_t / T²
    exactly; this uses that closed form rather than a bootstrap over rows (the same answer
    to within resampling noise, deterministic and O(T)). The variance takes each p_t
    Agresti–Coull adjusted, p̃_t = (k_t + z²/2) / (n_t + z²) over ñ_t = n_t + z² rows, so a
    task at 0 % or 100 % still contributes its uncertainty; the interval is centred on the
    reported average itself (so it always contains it) and clipped to [0, 1].
    """
    counts = [(k, n) for k, n in counts if n > 0]
    if not counts:
        return 0.0, 1.0
    t = len(counts)
    mean = sum(k / n for k, n in counts) / t
    adjusted = [((k + z * z / 2) / (n + z * z), n + z * z) for k, n in counts]
    half = z * math.sqrt(sum(p * (1 - p) / m for p, m in adjusted)) / t
    return max(0.0, mean - half), min(1.0, mean + half)


def ci95(correct: Correct) -> dict[str, list[float] | None]:
    """results.json's ``ci95`` of one row: ``{task: [lo, hi], ..., "avg": [lo, hi]}``
    (fractions, like ``acc``); None for a task without labels, and for ``avg`` when no task
    has any. Rounded to 6 decimals (the table shows 3)."""
    out: dict[str, list[float] | None] = {}
    counts = []
    for name, c in correct.items():
        if c is None:
            out[name] = None
            continue
        k, n = _counts(c)
        counts.append((k, n))
        out[name] = _rounded(wilson(k, n))
    out["avg"] = _rounded(average_interval(counts)) if counts else None
    return out


def _rounded(interval: tuple[float, float]) -> list[float]:
    return [round(interval[0], 6), round(interval[1], 6)]


def _scored(rows: Sequence[Correct]) -> list[tuple[str, list[np.ndarray]]]:
    """Per task scored by every row (labelled, at least one row): its name and the rows'
    correctness arrays (the same length: the same test rows)."""
    names = list(rows[0])
    for r in rows[1:]:
        if list(r) != names:
            raise ValueError(f"rows score different tasks: {names} vs {list(r)}")
    tasks = []
    for name in names:
        arrays = [r[name] for r in rows]
        if any(a is None for a in arrays):
            continue
        arrays = [np.asarray(a, dtype=bool) for a in arrays]
        if len({a.size for a in arrays}) != 1:
            raise ValueError(
                f"task '{name}': the rows were scored on different rows "
                f"({', '.join(str(a.size) for a in arrays)}); a paired test needs the same rows"
            )
        if arrays[0].size:
            tasks.append((name, arrays))
    return tasks


def _paired_bootstrap(tasks: list[list[np.ndarray]], resamples: int, seed: int) -> np.ndarray:
    """Per resample, every row's task-average accuracy: [B, R].

    Resamples each task's rows with replacement (stratified: each task keeps its n_t rows)
    and, PAIRED, uses the same resampled rows for every row R. A resample of n rows is
    determined by how many times each joint outcome (the R rows' right/wrong pattern, 2^R
    of them) is drawn: a multinomial over those patterns, which is exactly the bootstrap's
    distribution and costs O(B·2^R) per task instead of O(B·n).
    """
    rng = np.random.default_rng(seed)
    r = len(tasks[0])
    weights = 1 << np.arange(r)
    total = np.zeros((resamples, r))
    for arrays in tasks:
        stacked = np.stack(arrays, axis=1)  # [n, R]
        pattern = stacked.astype(np.int64) @ weights  # [n]
        freq = np.bincount(pattern, minlength=1 << r)
        n = stacked.shape[0]
        draws = rng.multinomial(n, freq / n, size=resamples)  # [B, 2^R]
        right = (np.arange(1 << r)[:, None] >> np.arange(r)[None, :]) & 1  # [2^R, R]
        total += draws @ right / n
    return total / len(tasks)


@dataclass(frozen=True)
class GapClosure:
    """How much of the gap from the plain merge to the experts surgery closed."""

    value: float | None  # None when the merge lost nothing (individual <= merged)
    ci95: list[float] | None  # None when the gap itself is not clearly positive in resamples
    resamples: int
    seed: int
    note: str = ""

    def to_json(self) -> dict:
        out = {
            "value": None if self.value is None else round(self.value, 6),
            "ci95": self.ci95,
            "method": "paired bootstrap over test rows, stratified by task, percentile",
            "resamples": self.resamples,
            "seed": self.seed,
        }
        return out | ({"note": self.note} if self.note else {})


def gap_closure(
    surgered: Correct,
    merged: Correct,
    individual: Correct,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> GapClosure:
    """``(surgered − merged) / (individual − merged)`` of the task averages, with its 95 %
    percentile interval from a seeded paired bootstrap over test rows: the three rows were
    scored on the same rows, so each resample draws rows once and rescores all three (their
    errors are correlated; resampling them independently would widen the interval).

    A ratio is unstable where its denominator nears 0: when more than 2.5 % of resamples
    have individual <= merged, the gap is not distinguishable from zero and the interval is
    None (with a note), rather than a number that means nothing.
    """
    tasks = [arrays for _, arrays in _scored([surgered, merged, individual])]
    if not tasks:
        return GapClosure(None, None, resamples, seed, "no task has labelled test rows")
    s, m, i = (sum(a[j].mean() for a in tasks) / len(tasks) for j in range(3))
    gap = i - m
    if gap <= 0:
        note = "the merge is not below the experts: no gap to close"
        return GapClosure(None, None, resamples, seed, note)
    boot = _paired_bootstrap(tasks, resamples, seed)
    gaps = boot[:, 2] - boot[:, 1]
    flat = float(np.mean(gaps <= 0))
    if flat > ALPHA / 2:
        note = f"in {100 * flat:.1f} % of resamples the experts are not above the merge"
        return GapClosure(float((s - m) / gap), None, resamples, seed, note)
    ratios = (boot[:, 0] - boot[:, 1]) / gaps
    lo, hi = np.quantile(ratios, [ALPHA / 2, 1 - ALPHA / 2])
    return GapClosure(float((s - m) / gap), _rounded((float(lo), float(hi))), resamples, seed)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under "A and B are equally accurate" each of the
    n = a_only + b_only discordant rows goes either way with probability 1/2, so
    p = min(1, 2·P[Binomial(n, 1/2) <= min(a_only, b_only)]); 1 when n = 0."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    low = min(a_only, b_only)
    # log-space sum of C(n, j) / 2^n for j <= low: exact to float precision for any n
    log_comb = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(low + 1)
    ]
    top = max(log_comb)
    log_tail = top + math.log(sum(math.exp(x - top) for x in log_comb)) - n * math.log(2)
    return min(1.0, 2 * math.exp(log_tail))


@dataclass(frozen=True)
class Comparison:
    """Row A vs row B scored on the same rows."""

    a: str
    b: str
    verdict: str  # "beats" (A above B), "below", or "ties within noise"
    p_value: float
    difference: float  # A's average − B's (fraction)
    difference_ci95: list[float]
    per_task: dict[str, dict]  # task -> {"a_only", "b_only", "difference", "p_value", "verdict"}
    test: str

    def to_json(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "p_value": _significant(self.p_value),
            "difference": round(self.difference, 6),
            "difference_ci95": self.difference_ci95,
            "test": self.test,
            "alpha": ALPHA,
            "per_task": self.per_task,
        }

    def sentence(self) -> str:
        """``beats individual (+0.3 points, p = 0.021)``: the verdict as a phrase."""
        return (
            f"{self.verdict} {self.b} ({100 * self.difference:+.1f} points, "
            f"{p_clause(self.p_value)})"
        )


def p_text(p: float) -> str:
    """A p-value for a table cell: ``0.021`` or ``< 0.001``."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_clause(p: float, name: str = "p") -> str:
    """A p-value in a sentence: ``p = 0.021`` or ``p < 0.001``."""
    return f"{name} < 0.001" if p < 0.001 else f"{name} = {p:.3f}"


def verdict(difference: float, p_value: float, alpha: float = ALPHA) -> str:
    if p_value < alpha and difference > 0:
        return "beats"
    if p_value < alpha and difference < 0:
        return "below"
    return "ties within noise"


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def compare(a: Correct, b: Correct, a_name: str = "A", b_name: str = "B") -> Comparison:
    """Is row A more accurate than row B on the same test rows?

    Per task: the exact McNemar test on the discordant rows (A right and B wrong: ``a_only``;
    the reverse: ``b_only``). For the average of T tasks: a stratified paired test of
    d = Σ_t (a_only_t − b_only_t)/n_t / T, whose variance under the multinomial of each
    task's rows is Σ_t [(a_only_t + b_only_t)/n_t − d_t²]/n_t / T² exactly; d/sd is referred
    to the normal (the discordant counts of a benchmark's test split are large). With one
    task the exact McNemar test is used for the average too. ``difference_ci95`` is
    d ± 1.96·sd. The verdict is "beats"/"below" at p < 0.05, else "ties within noise".
    """
    tasks = _scored([a, b])
    if not tasks:
        raise ValueError(f"{a_name} vs {b_name}: no task has labelled test rows to compare on")
    per_task, diffs, variances, p_values = {}, [], [], []
    for name, (ca, cb) in tasks:
        n = ca.size
        a_only, b_only = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
        d = (a_only - b_only) / n
        p = mcnemar_exact(a_only, b_only)
        per_task[name] = {
            "a_only": a_only,
            "b_only": b_only,
            "rows": n,
            "difference": round(d, 6),
            "p_value": _significant(p),
            "verdict": verdict(d, p),
        }
        diffs.append(d)
        p_values.append(p)
        variances.append(max(0.0, ((a_only + b_only) / n - d * d) / n))
    t = len(diffs)
    d = sum(diffs) / t
    sd = math.sqrt(sum(variances)) / t
    if t == 1:
        p, test = p_values[0], "exact McNemar"
    else:
        p = 1.0 if sd == 0 else _normal_two_sided(d / sd)
        test = "exact McNemar per task; stratified paired z-test of the average"
    interval = _rounded((d - Z95 * sd, d + Z95 * sd))
    return Comparison(a_name, b_name, verdict(d, p), p, d, interval, per_task, test)


def _significant(p: float) -> float:
    """A p-value to 4 significant digits (6 decimals would print 1e-9 as 0)."""
    return float(f"{p:.4g}")
