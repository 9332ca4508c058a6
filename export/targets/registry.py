"""The export-target registry: what ``python -m export.onnx --target NAME`` writes.

``export.onnx.export`` builds the fused graph, verifies it against PyTorch (parity, padding)
and hands a :class:`VerifiedExport` to the target's writer. A target is one module in
``export/targets/`` with one ``@register("<name>", help=...)`` writer; it may rewrite the
graph for its server (then it re-verifies it with ``VerifiedExport.check``), and must write
nothing half (a temporary sibling renamed at the end: ``modeldir.atomic_directory``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError


@dataclass
class VerifiedExport:
    """A graph that passed its parity bar, and what a target needs to write it."""

    staging: Path  # a temporary folder holding ``files`` (removed after the target wrote)
    files: list[str]  # model.onnx first, then per-task graphs, tokenizer.json (text)
    manifest: dict  # the model directory's manifest (sha256 of ``files``, parity, tasks, ...)
    # re-verify a rewritten graph against the same PyTorch reference, every row its own input
    # (no fan-out): (path, what) -> the parity record; a UserError when it misses the bar
    check: Callable[[Path, str], dict]
    options: dict = field(default_factory=dict)  # the target's CLI options (--name, ...)


@dataclass(frozen=True)
class Target:
    name: str
    write: Callable[[VerifiedExport, Path], Path]  # -> the path of the main graph written
    help: str


TARGETS: dict[str, Target] = {}


def register(name: str, help: str):
    """Decorator: make ``write(verified, out) -> graph path`` the export target ``name``."""

    def wrap(write: Callable[[VerifiedExport, Path], Path]):
        if name in TARGETS:
            raise ValueError(f"export target '{name}' is registered twice")
        TARGETS[name] = Target(name, write, help)
        return write

    return wrap


def get_target(name: str) -> Target:
    """The registered target ``name``; else a one-line error listing the known ones."""
    if name not in TARGETS:
        raise UserError(
            f"--target '{name}' is unknown; known targets: {', '.join(sorted(TARGETS))}"
        )
    return TARGETS[name]
