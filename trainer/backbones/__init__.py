"""Backbones: the block-wise interface (``base``), the kind registry (``registry``) and one
module per kind, each registering its settings and its ``Backbone`` class.

Every module of this package is imported here, so adding a kind is adding one file
(``trainer/backbones/<name>.py`` ending with ``register("<name>", Settings, Backbone)``).
"""

import importlib
import pkgutil

from .base import Backbone
from .hf_text import HFTextBackbone, HFTextSettings, resolve_model_dir
from .hf_vision import HFVisionBackbone, HFVisionSettings
from .open_clip_vit import OpenClipViTBackbone, OpenClipViTSettings
from .registry import (
    KINDS,
    BackboneSettings,
    backbone_from_spec,
    build_backbone,
    get_kind,
    register,
    settings_for,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry") and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KINDS",
    "Backbone",
    "BackboneSettings",
    "HFTextBackbone",
    "HFTextSettings",
    "HFVisionBackbone",
    "HFVisionSettings",
    "OpenClipViTBackbone",
    "OpenClipViTSettings",
    "backbone_from_spec",
    "build_backbone",
    "get_kind",
    "register",
    "resolve_model_dir",
    "settings_for",
]
