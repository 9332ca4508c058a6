"""The merge-method registry (mergekit's pattern): each method is one small function that
declares its parameters where it is defined and registers itself by name.

A method takes the pretrained state dict Θ(0) and the experts' state dicts Θ(1..T) (backbone
only: heads are never merged) and returns the merged state dict; non-floating tensors (index
buffers) are copied from the base. Methods that learn from unlabeled data declare
``needs_data=True`` and also receive a :class:`MergeContext`. The config's ``[merge.<method>]``
tables are validated against the declared parameters before any work starts.

A parameter declared with a ``grid`` is chosen on validation data unless the config pins it:
absent or ``"search"`` searches the declared grid, an array searches those values, a number
pins it (see ``merging.search``). A method whose result is Θ(0) + s·Δ in one parameter s
declares it as ``scale``: the search then merges once per value of the other parameters and
only rescales Δ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError

StateDict = dict[str, torch.Tensor]


SEARCH = "search"  # the config value that asks for a search over a parameter's grid


@dataclass(frozen=True)
class Searched:
    """A parameter to be chosen on validation data among ``grid`` (not yet a value)."""

    grid: tuple


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a merge method: name, type, default and allowed range, and
    the grid it is searched over when the config does not pin it (no grid: never searched,
    absent means ``default``)."""

    name: str
    type: type  # float | int | bool | str
    default: Any  # the value when neither given nor searched (e.g. a direct ``merge`` call)
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple = ()  # allowed values for strings
    help: str = ""
    grid: tuple = ()  # candidate values tried on validation data

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this parameter's type (a :class:`Searched` for ``"search"``
        or an array of candidates), or a UserError naming the key."""
        if isinstance(value, Searched):
            value = list(value.grid)
        if value == SEARCH or isinstance(value, list):
            if not self.grid:
                raise UserError(
                    f"config key '{where}' cannot be searched (no grid is declared for it); "
                    f"give one value"
                )
            if value == SEARCH:
                return Searched(self.grid)
            if not value or any(isinstance(v, list) or v == SEARCH for v in value):
                raise UserError(
                    f"config key '{where}' must be a value, \"{SEARCH}\" or a non-empty array "
                    f"of candidate values, got {value!r}"
                )
            return Searched(tuple(dict.fromkeys(self.check(v, where) for v in value)))
        if self.type is bool:
            if not isinstance(value, bool):
                raise UserError(f"config key '{where}' must be true or false, got {value!r}")
        elif self.type in (int, float):
            ok = isinstance(value, int) if self.type is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                kind = "an integer" if self.type is int else "a number"
                if self.grid:
                    kind += f', "{SEARCH}" or an array of candidates'
                raise UserError(f"config key '{where}' must be {kind}, got {value!r}")
            value = self.type(value)
            if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high
            ):
                raise UserError(
                    f"config key '{where}' = {value} is out of range; "
                    f"allowed {self.low if self.low is not None else '-inf'}.."
                    f"{self.high if self.high is not None else 'inf'}"
                )
        elif self.type is str:
            if not isinstance(value, str):
                raise UserError(f"config key '{where}' must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise UserError(
                    f"config key '{where}' = {value!r}; valid: {', '.join(self.choices)}"
                )
        return value


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., StateDict]
    params: tuple[Param, ...] = ()
    needs_data: bool = False  # learns from unlabeled inputs: gets ``context=MergeContext``
    scale: str | None = None  # the parameter s of a result Θ(0) + s·Δ (Δ not depending on s)

    def hparams(self, table: dict, where: str, search: bool = True) -> dict:
        """The config table ``[merge.<name>]`` checked and completed: a parameter with a grid
        that the table leaves out is searched (``search=False``: its default)."""
        known = {p.name: p for p in self.params}
        for key in table:
            if key not in known:
                raise UserError(
                    f"unknown config key '{where}.{key}'; valid: "
                    f"{', '.join(known) or '(none: this method takes no parameters)'}"
                )
        return {
            p.name: p.check(
                table.get(p.name, SEARCH if search and p.grid else p.default), f"{where}.{p.name}"
            )
            for p in self.params
        }


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    params: list[Param] | tuple[Param, ...] = (),
    needs_data: bool = False,
    scale: str | None = None,
):
    """Decorator: make ``fn`` the merge method ``name`` with the given parameters; ``scale``
    names the parameter its result is affine in (Θ(0) + scale·Δ)."""

    def wrap(fn: Callable[..., StateDict]) -> Callable[..., StateDict]:
        if name in METHODS:
            raise ValueError(f"merge method '{name}' is registered twice")
        if scale is not None and scale not in {p.name for p in params}:
            raise ValueError(f"merge method '{name}': scale '{scale}' is not one of its params")
        METHODS[name] = MergeMethod(name, fn, tuple(params), needs_data, scale)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UserError(f"unknown merge method '{name}'; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass
class MergeContext:
    """What data-driven methods need beyond the weights (nothing here is labelled)."""

    backbone: nn.Module  # a Backbone holding the base weights (the method must not change it)
    heads: nn.Module  # the frozen per-task Heads
    unlabeled: list  # per task: a list of inputs
    device: torch.device
    seed: int = 0
    extra: dict = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # the tasks' names, for log lines


def merge(
    name: str,
    base: StateDict,
    experts: list[StateDict],
    hparams: dict | None = None,
    context: MergeContext | None = None,
) -> StateDict:
    """Run merge method ``name`` with ``hparams`` (defaults for the ones not given; a
    searched parameter must have been chosen first, see ``merging.search``)."""
    method = get_method(name)
    kwargs = method.hparams(hparams or {}, f"merge.{name}", search=False)
    searched = [k for k, v in kwargs.items() if isinstance(v, Searched)]
    if searched:
        raise ValueError(f"merge method '{name}': choose {searched} first (merging.search)")
    if method.needs_data:
        if context is None:
            raise ValueError(f"merge method '{name}' learns from data: pass a MergeContext")
        kwargs["context"] = context
    return method.fn(base, experts, **kwargs)


# ---- helpers shared by the methods ---------------------------------------------------------


def mergeable(base: StateDict) -> list[str]:
    """Names of the tensors merging acts on (the floating ones)."""
    return [k for k, v in base.items() if v.is_floating_point()]


def task_vectors(base: StateDict, experts: list[StateDict]) -> list[StateDict]:
    """τ_t = Θ(t) − Θ(0) for every floating tensor."""
    keys = mergeable(base)
    return [{k: expert[k] - base[k] for k in keys} for expert in experts]


def apply_delta(base: StateDict, delta: StateDict) -> StateDict:
    """Θ(0) + Δ for the tensors in ``delta``, copies of the base elsewhere."""
    return {k: (v + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}
