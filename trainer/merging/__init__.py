"""Stage 3, merging: the registry, one module per method family that registers itself, and
``search`` (a method's hyper-parameters chosen on validation data).

Every module of this package except ``registry`` is imported here, so adding a method is
adding one file (``trainer/merging/<name>.py`` with an ``@register(...)`` function).
"""

import importlib
import pkgutil

from .registry import (
    METHODS,
    SEARCH,
    MergeContext,
    MergeMethod,
    Param,
    Searched,
    StateDict,
    apply_delta,
    get_method,
    merge,
    mergeable,
    register,
    task_vectors,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "SEARCH",
    "MergeContext",
    "MergeMethod",
    "Param",
    "Searched",
    "StateDict",
    "apply_delta",
    "get_method",
    "merge",
    "mergeable",
    "register",
    "task_vectors",
]
