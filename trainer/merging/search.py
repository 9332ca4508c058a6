"""Choosing a merge method's hyper-parameters on validation data.

The Task Arithmetic paper picks λ from {0.05, 0.10, ..., 1.0} by the average validation
accuracy over tasks; the Ties paper searches k and λ the same way. Here every parameter that
a method declares with a ``grid`` and the config does not pin is searched: candidates are
merged and scored by ``score(state)`` (the caller's forward of the validation rows through the
merged backbone and each task's own head), and the best one is chosen (on a tie the first in
grid order). A method declaring a ``scale`` parameter s (Θ(0) + s·Δ) is merged once per
combination of its other parameters: each s is only a rescaling of that Δ.

Two strategies:

- ``grid``: every combination (Task Arithmetic 20 candidates, Ties-Merging 3 k × 20 λ = 60).
- ``coarse-to-fine`` (the default): along the line parameter (the ``scale``, else the last
  searched one) of n values, every s-th value (s = round(√n): 4 of 20) for every combination
  of the others, then a walk from the best of those along its line, one grid step at a time
  towards higher scores, until a step stops improving: at most s more. When the score rises
  strictly to one peak (flat, if at all, only at the top) and then falls along the line, the
  grid's winner lies within s - 1 steps of the coarse winner and the walk reaches it, ties
  included (walking left it also moves on equal scores, as the grid keeps the first best):
  the grid's own choice. For several combinations (Ties' k) the walk runs on the coarse
  winner's only. On the shipped grids: ≤ 9 candidates for Task Arithmetic (of 20) and ≤ 19
  for Ties-Merging (of 60). A grid too small to gain from it is searched whole.

The chosen candidate's merged state is kept (``SearchResult.state``): the caller uses it
rather than merging again, and it is exactly the state that was scored.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from ..progress import progress
from .registry import MergeContext, Searched, StateDict, get_method, merge, mergeable

# score(state) -> (the mean over tasks, one value per task)
Score = Callable[[StateDict], tuple[float, list[float]]]

GRID, COARSE_TO_FINE = "grid", "coarse-to-fine"
STRATEGIES = (COARSE_TO_FINE, GRID)


@dataclass
class SearchResult:
    method: str
    chosen: dict  # every parameter's value, the searched ones as chosen
    searched: list[str]  # the parameters that were searched, in search order
    pinned: list[str]  # searchable parameters the config pinned
    grid: dict[str, list]  # the values of each searched parameter (the exhaustive grid)
    candidates: list[dict]  # in scoring order: the searched parameters' values and "score"
    score: float  # the chosen candidate's mean over tasks
    per_task: list[float]  # ... and per task
    seconds: float
    strategy: str = GRID  # how candidates were picked from the grid (STRATEGIES)
    evaluated: int = 0  # candidates merged and scored, of ``grid_size``
    state: StateDict | None = field(default=None, repr=False)  # the chosen merge, as scored

    def to_json(self) -> dict:
        """results.json's record of the search: everything but the merged state."""
        record = asdict(dataclasses.replace(self, state=None))  # asdict would copy tensors
        del record["state"]
        return record

    @property
    def grid_size(self) -> int:
        """How many candidates the exhaustive grid holds."""
        return math.prod(len(v) for v in self.grid.values())

    def values(self) -> str:
        """``λ=0.45 k=20``: the searched parameters as chosen."""
        return " ".join(
            f"{symbol(k)}={_number(self.chosen[k], self.grid[k])}" for k in self.searched
        )

    def pinned_values(self) -> str:
        """``k=20``: the searchable parameters the config pinned."""
        return " ".join(f"{symbol(k)}={_number(self.chosen[k], [])}" for k in self.pinned)

    def grid_text(self) -> str:
        """``grid 0.05..1.0`` (one parameter) or ``grid λ 0.1..2.0 × k 10..30``."""
        parts = [
            f"{symbol(k)} {_span(v)}" if len(self.grid) > 1 else _span(v)
            for k, v in self.grid.items()
        ]
        return f"grid {' × '.join(parts)}"

    def counted(self) -> str:
        """``9 of 20 candidates (coarse-to-fine)``, or ``20 candidates`` for the whole grid."""
        if self.evaluated == self.grid_size:
            return f"{self.evaluated} candidates"
        return f"{self.evaluated} of {self.grid_size} candidates ({self.strategy})"


def coarse_stride(n: int) -> int:
    """The coarse pass's step along a line of ``n`` values: ≈ √n, which balances the coarse
    points (n / s) against the walk's worst case (s)."""
    return max(2, round(math.sqrt(n)))


def search(
    name: str,
    base: StateDict,
    experts: list[StateDict],
    hparams: dict,
    score: Score,
    context: MergeContext | None = None,
    strategy: str = COARSE_TO_FINE,
) -> SearchResult | None:
    """The best combination of ``hparams``' searched values (:class:`Searched`) by ``score``,
    its merged state kept; None when the config pins every parameter. ``strategy``: which
    candidates are scored (``coarse-to-fine``, or every one: ``grid``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"search strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")
    method = get_method(name)
    grids = {k: list(v.grid) for k, v in hparams.items() if isinstance(v, Searched)}
    if not grids:
        return None
    started = time.perf_counter()
    fixed = {k: v for k, v in hparams.items() if k not in grids}
    scale = method.scale if method.scale in grids else None
    line = scale or list(grids)[-1]  # the parameter coarse-to-fine walks along
    outer = [k for k in grids if k != line]
    combos = [dict(zip(outer, c)) for c in itertools.product(*(grids[k] for k in outer))]
    n, stride = len(grids[line]), coarse_stride(len(grids[line]))
    if len(combos) * len(range(0, n, stride)) + stride >= len(combos) * n:
        strategy = GRID  # a grid this small gains nothing: every candidate is scored
    tried = _Candidates(
        name, base, experts, fixed, context, combos, line, grids[line], scale, score
    )
    plan = _Plan(strategy, len(combos), n, stride, tried)
    bar = progress(plan, f"{name} search", "candidate")
    for combo, i in bar:
        tried.score(combo, i)
        bar.set_postfix(best=f"{100 * tried.best[0]:.1f}%")
    bar.close()
    value, per_task, (combo, i) = tried.best
    order = [*([scale] if scale else []), *outer]  # how they are reported
    return SearchResult(
        method=name,
        chosen={**fixed, **combos[combo], line: grids[line][i]},
        searched=order,
        pinned=[p.name for p in method.params if p.grid and p.name not in grids],
        grid={k: grids[k] for k in order},
        candidates=[{**{k: c[k] for k in order}, "score": c["score"]} for c in tried.records],
        score=value,
        per_task=list(per_task),
        seconds=round(time.perf_counter() - started, 1),
        strategy=strategy,
        evaluated=len(tried.records),
        state=tried.kept(),
    )


class _Candidates:
    """Merges and scores candidates (combination index, index along the line), keeping the
    best (the first in grid order on a tie) with its state, and for a ``scale`` method the Δ
    (at scale 1) of the combination being scored and of the best one."""

    def __init__(self, name, base, experts, fixed, context, combos, line, values, scale, score):
        self.name, self.base, self.experts, self.fixed = name, base, experts, fixed
        self.context: MergeContext | None = context  # what a data-driven method learns from
        self.combos, self.line, self.values, self.scale = combos, line, values, scale
        self.score_fn: Score = score
        self.scores: dict[tuple[int, int], float] = {}
        self.records: list[dict] = []  # in scoring order: the parameters and "score"
        self.best: tuple[float, list[float], tuple[int, int]] | None = None
        self._best_state: StateDict | None = None
        self._deltas: dict[int, StateDict] = {}

    def params(self, combo: int, i: int) -> dict:
        return {**self.fixed, **self.combos[combo], self.line: self.values[i]}

    def _delta(self, combo: int) -> StateDict:
        if combo not in self._deltas:
            unit = merge(
                self.name,
                self.base,
                self.experts,
                {**self.params(combo, 0), self.scale: 1.0},
                self.context,
            )
            keep = self.best[2][0] if self.best else None  # the walk may come back to it
            self._deltas = {c: d for c, d in self._deltas.items() if c == keep}
            self._deltas[combo] = {k: unit[k] - self.base[k] for k in mergeable(self.base)}
        return self._deltas[combo]

    def state(self, combo: int, i: int) -> StateDict:
        params = self.params(combo, i)
        if self.scale is None:
            return merge(self.name, self.base, self.experts, params, self.context)
        delta, s = self._delta(combo), params[self.scale]
        return {
            k: (v + s * delta[k]).to(v.dtype) if k in delta else v for k, v in self.base.items()
        }

    def score(self, combo: int, i: int) -> None:
        state = self.state(combo, i)
        value, per_task = self.score_fn(state)
        self.scores[(combo, i)] = value
        self.records.append({**self.params(combo, i), "score": value})
        best = self.best
        if best is None or value > best[0] or (value == best[0] and (combo, i) < best[2]):
            self.best, self._best_state = (value, per_task, (combo, i)), state

    def kept(self) -> StateDict:
        """The best candidate's state, owning its tensors (none shared with the base)."""
        base = self.base
        return {k: v.clone() if v is base[k] else v for k, v in self._best_state.items()}


@dataclass
class _Plan:
    """The candidates to score, in order, as (combination, index along the line); a
    generator that reads each one's score before choosing the next. ``len``: the most it
    may yield (for progress)."""

    strategy: str
    combos: int
    n: int
    stride: int
    tried: _Candidates

    def __len__(self) -> int:
        if self.strategy == GRID:
            return self.combos * self.n
        return self.combos * len(range(0, self.n, self.stride)) + self.stride

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.strategy == GRID:
            yield from itertools.product(range(self.combos), range(self.n))
            return
        yield from itertools.product(range(self.combos), range(0, self.n, self.stride))
        # the walk from the coarse winner: right while the score strictly rises; if it did
        # not, left while it does not fall (the grid keeps the first of equal scores)
        combo, start = self.tried.best[2]
        scores = self.tried.scores
        i = start
        while i + 1 < min(self.n, start + self.stride):
            yield combo, i + 1
            if scores[(combo, i + 1)] <= scores[(combo, i)]:
                break
            i += 1
        if i > start:
            return
        while i - 1 > max(-1, start - self.stride):
            yield combo, i - 1
            if scores[(combo, i - 1)] < scores[(combo, i)]:
                break
            i -= 1


def symbol(name: str) -> str:
    """How a parameter is written for people: ``lam`` as λ where the console can show it."""
    if name != "lam":
        return name
    try:
        "λ".encode(sys.stdout.encoding or "ascii")
        "λ".encode(sys.stderr.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "lam"
    return "λ"


def _number(value, grid: list) -> str:
    """``20`` on a grid of whole numbers, ``1.0`` / ``0.45`` on a grid of fractions."""
    if not isinstance(value, float):
        return str(value)
    whole = all(isinstance(v, (int, float)) and float(v).is_integer() for v in grid)
    return f"{value:g}" if whole or not value.is_integer() else f"{value:.1f}"


def _span(values: list) -> str:
    if len(values) == 1:
        return _number(values[0], values)
    numeric = all(isinstance(v, (int, float)) for v in values)
    low, high = (min(values), max(values)) if numeric else (values[0], values[-1])
    return f"{_number(low, values)}..{_number(high, values)}"
