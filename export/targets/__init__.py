"""Export targets: the registry, and one module per target (``modeldir``: the directory
``runtime.server`` reads; ``triton``: a Triton Inference Server model repository).

Every module of this package is imported here, so adding a target is adding one file
(``export/targets/<name>.py`` with an ``@register("<name>", help=...)`` writer).
"""

import importlib
import pkgutil

from .registry import TARGETS, Target, VerifiedExport, get_target, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TARGETS", "Target", "VerifiedExport", "get_target", "register"]
