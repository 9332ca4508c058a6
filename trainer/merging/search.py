"""Choosing a merge method's hyper-parameters on validation data: a grid search.

The Task Arithmetic paper picks λ from {0.05, 0.10, ..., 1.0} by the average validation
accuracy over tasks; the Ties paper searches k and λ the same way. Here every parameter that
a method declares with a ``grid`` and the config does not pin is searched: every combination
of the grids is merged and scored by ``score(state)`` (the caller's forward of the validation
rows through the merged backbone and each task's own head), and the best one is chosen (on a
tie the first in grid order). A method declaring a ``scale`` parameter s (Θ(0) + s·Δ) is
merged once per combination of its other parameters: each s is only a rescaling of that Δ.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..progress import progress
from .registry import MergeContext, Searched, StateDict, get_method, merge, mergeable

# score(state) -> (the mean over tasks, one value per task)
Score = Callable[[StateDict], tuple[float, list[float]]]


@dataclass
class SearchResult:
    method: str
    chosen: dict  # every parameter's value, the searched ones as chosen
    searched: list[str]  # the parameters that were searched, in search order
    pinned: list[str]  # searchable parameters the config pinned
    grid: dict[str, list]  # the values tried per searched parameter
    candidates: list[dict]  # in search order: the searched parameters' values and "score"
    score: float  # the chosen candidate's mean over tasks
    per_task: list[float]  # ... and per task
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)

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


def search(
    name: str,
    base: StateDict,
    experts: list[StateDict],
    hparams: dict,
    score: Score,
    context: MergeContext | None = None,
) -> SearchResult | None:
    """The best combination of ``hparams``' searched values (:class:`Searched`) by ``score``;
    None when the config pins every parameter."""
    method = get_method(name)
    grids = {k: list(v.grid) for k, v in hparams.items() if isinstance(v, Searched)}
    if not grids:
        return None
    started = time.perf_counter()
    fixed = {k: v for k, v in hparams.items() if k not in grids}
    scale = method.scale if method.scale in grids else None
    outer = [k for k in grids if k != scale]
    points = []
    for combo in itertools.product(*(grids[k] for k in outer)):
        point = dict(zip(outer, combo))
        points += [{**point, scale: s} for s in grids[scale]] if scale else [point]
    order = [*([scale] if scale else []), *outer]  # how they are reported
    candidates, best = [], None
    delta_of, delta = None, {}
    bar = progress(points, f"{name} search", "candidate")
    for point in bar:
        params = {**fixed, **point}
        if scale is None:
            state = merge(name, base, experts, params, context)
        else:
            key = tuple(point[k] for k in outer)
            if key != delta_of:  # Δ of this combination: merged once, at scale 1
                unit = merge(name, base, experts, {**params, scale: 1.0}, context)
                delta = {k: unit[k] - base[k] for k in mergeable(base)}
                delta_of = key
                del unit
            s = point[scale]
            state = {
                k: (v + s * delta[k]).to(v.dtype) if k in delta else v for k, v in base.items()
            }
        value, per_task = score(state)
        candidates.append({**{k: point[k] for k in order}, "score": value})
        if best is None or value > best[0]:
            best = (value, per_task, point)
        bar.set_postfix(best=f"{100 * best[0]:.1f}%")
    bar.close()
    value, per_task, point = best
    return SearchResult(
        method=name,
        chosen={**fixed, **point},
        searched=order,
        pinned=[p.name for p in method.params if p.grid and p.name not in grids],
        grid={k: grids[k] for k in order},
        candidates=candidates,
        score=value,
        per_task=list(per_task),
        seconds=round(time.perf_counter() - started, 1),
    )


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
