"""The backbone-kind registry (open_clip's ``factory.py`` and the merge-method registry's
pattern): each kind is one module that defines its settings dataclass (the ``[backbone]`` keys
it reads, nothing else) and a ``Backbone`` subclass, and registers the pair by name.

Everything a kind has to say lives on those two classes, so nothing else in the project asks
"which kind is this?":

- the settings dataclass (subclass of :class:`BackboneSettings`): its fields are the config's
  ``[backbone]`` keys for that kind, ``check()`` validates them before any work starts;
- the backbone class: ``from_settings`` builds the pretrained base, ``from_spec`` rebuilds the
  architecture from a bundle's manifest, ``preprocessing()`` states how raw inputs become
  tensors (recorded in every manifest), ``write_expert`` / ``write_base`` save an expert or a
  base in its library's own format (``python -m trainer.export_experts``).

Adding a kind is one file in ``trainer/backbones/`` that ends with
``register("<name>", MySettings, MyBackbone)``; the package imports every module in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import UserError
from .base import Backbone


@dataclass
class BackboneSettings:
    """The ``[backbone]`` keys every kind has; a kind's settings subclass this.

    ``path``: where the pretrained weights are (a folder, a file or a hub id; what "" means is
    the kind's to say). A field whose value is ``""`` may be filled from the experts' own
    files (:func:`trainer.experts.expert.settle_backbone`) before the base is built.
    """

    path: str = ""
    kind: ClassVar[str] = ""  # set by ``register``

    def check(self) -> None:
        """Raise a UserError naming the key and the fix when a value is invalid."""

    def fields(self) -> dict:
        """``{"kind": ..., every field: value}``: the config as written to results.json."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class BackboneKind:
    name: str
    settings: type[BackboneSettings]
    backbone: type[Backbone]


KINDS: dict[str, BackboneKind] = {}


def register(name: str, settings: type[BackboneSettings], backbone: type[Backbone]) -> None:
    """Make ``backbone`` (built from ``settings``) the backbone kind ``name``."""
    if name in KINDS:
        raise ValueError(f"backbone kind '{name}' is registered twice")
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, BackboneSettings)):
        raise ValueError(f"backbone kind '{name}': settings must be a BackboneSettings dataclass")
    settings.kind = name
    backbone.kind = name
    KINDS[name] = BackboneKind(name, settings, backbone)


def get_kind(name: str) -> BackboneKind:
    """The registered kind ``name``; else a one-line error listing the known ones."""
    if name not in KINDS:
        raise UserError(
            f"backbone.kind '{name}' is unknown; known kinds: {', '.join(sorted(KINDS))}"
        )
    return KINDS[name]


def settings_for(kind: str, **values) -> BackboneSettings:
    """The settings of ``kind`` with ``values`` (the rest at their defaults), checked."""
    settings = get_kind(kind).settings(**values)
    settings.check()
    return settings


def build_backbone(settings: BackboneSettings) -> Backbone:
    """The pretrained base of a config's ``[backbone]``."""
    return get_kind(settings.kind).backbone.from_settings(settings)


def backbone_from_spec(spec: dict, asset_dir: str | Path | None) -> Backbone:
    """Rebuild a backbone's architecture (random weights) from a bundle's manifest entry and
    the assets saved beside it (``Backbone.save_assets``)."""
    kind = spec.get("kind", "")
    if kind not in KINDS:
        raise UserError(
            f"the bundle's backbone kind '{kind}' is unknown here; known kinds: "
            f"{', '.join(sorted(KINDS))}"
        )
    return KINDS[kind].backbone.from_spec(spec, asset_dir)
