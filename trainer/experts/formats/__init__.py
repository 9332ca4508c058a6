"""The formats of fine-tuned experts a task's ``expert`` may point at: the registry, and one
module per format that registers a detector and a loader.

Every module of this package except ``registry`` is imported here, so supporting a new format
is adding one file (``trainer/experts/formats/<name>.py`` with an ``@register(...)`` loader).
"""

import importlib
import pkgutil

from .registry import (
    FORMATS,
    ExpertFormat,
    ExpertSource,
    LoadedExpert,
    detect_format,
    load_expert,
    read_head_file,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FORMATS",
    "ExpertFormat",
    "ExpertSource",
    "LoadedExpert",
    "detect_format",
    "load_expert",
    "read_head_file",
    "register",
]
