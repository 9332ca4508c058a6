"""pyproject.toml tells the truth: the declared Python floor covers the stdlib modules the
sources import, ruff lints for that floor, and the installed open_clip still has the private
names the ViT backbone relies on."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Standard-library modules added after 3.10, with the release that added them. Extend this
# when a newer one is imported (3.12 and 3.13 added none that this project uses).
NEW_STDLIB_MODULES = {
    "tomllib": (3, 11),
    "wsgiref.types": (3, 11),
}
SKIP_DIRS = {"runs", "build", "dist", "__pycache__", "node_modules"}


def python_floor() -> tuple[int, int]:
    spec = PYPROJECT["project"]["requires-python"]
    floors = re.findall(r">=\s*(\d+)\.(\d+)", spec)
    assert len(floors) == 1, f"requires-python {spec!r} should have exactly one '>=X.Y'"
    return int(floors[0][0]), int(floors[0][1])


def imported_modules(source: str) -> set[str]:
    """Every absolute module an import statement may load, parents included:
    ``import a.b`` -> {a, a.b}; ``from a.b import c`` -> {a, a.b, a.b.c} (c may be a module)."""
    found: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        found.update(".".join(parts[: i + 1]) for i in range(len(parts)))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module)
            for alias in node.names:
                if alias.name != "*":
                    add(f"{node.module}.{alias.name}")
    return found


def project_sources() -> list[Path]:
    return sorted(
        path
        for path in REPO.rglob("*.py")
        if not any(
            part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info")
            for part in path.relative_to(REPO).parts[:-1]
        )
    )


def test_imported_modules_sees_every_import_form():
    source = (
        "import tomllib\nimport wsgiref.types as t\nfrom wsgiref import types\n"
        "from .local import tomllib\nfrom os import path\n"
    )
    assert imported_modules(source) >= {"tomllib", "wsgiref", "wsgiref.types", "os.path"}
    assert imported_modules("from .config import tomllib") == set()


def test_new_stdlib_modules_are_available_at_the_declared_floor():
    floor = python_floor()
    users: dict[str, list[str]] = {}
    for path in project_sources():
        try:
            modules = imported_modules(path.read_text())
        except SyntaxError as exc:
            pytest.fail(f"{path.relative_to(REPO)} does not parse: {exc}")
        for module in modules & NEW_STDLIB_MODULES.keys():
            users.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert "tomllib" in users, "the scan should find trainer's tomllib import"
    too_new = {
        module: (NEW_STDLIB_MODULES[module], files)
        for module, files in users.items()
        if NEW_STDLIB_MODULES[module] > floor
    }
    assert not too_new, (
        f"requires-python floor {floor} lacks these stdlib modules (added in, used by): "
        f"{too_new}; raise requires-python"
    )


def test_ruff_targets_the_declared_floor():
    major, minor = python_floor()
    target = PYPROJECT["tool"]["ruff"]["target-version"]
    assert target == f"py{major}{minor}", f"ruff target-version {target} != requires-python floor"


def test_running_interpreter_satisfies_the_floor():
    assert sys.version_info[:2] >= python_floor()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_open_clip_has_the_private_names_the_vit_backbone_uses():
    pytest.importorskip("open_clip", reason="the train extra is not installed")
    from open_clip import model as open_clip_model
    from open_clip.transformer import VisionTransformer

    installed = metadata.version("open_clip_torch")
    needed = {
        "open_clip.model._build_vision_tower": (open_clip_model, "_build_vision_tower"),
        "VisionTransformer._embeds": (VisionTransformer, "_embeds"),
        "VisionTransformer._pool": (VisionTransformer, "_pool"),
    }
    missing = [name for name, (owner, attr) in needed.items() if not hasattr(owner, attr)]
    assert not missing, (
        f"open_clip_torch {installed} lacks {missing}, which trainer/backbones/open_clip_vit.py "
        "uses; install a release that has them (2.32.0 and 3.3.0 do) or adapt the backbone"
    )
    declared = [
        req for req in PYPROJECT["project"]["optional-dependencies"]["train"] if "open_clip" in req
    ]
    assert len(declared) == 1 and ">=" in declared[0], declared
    floor = _version(declared[0].split(">=", 1)[1])
    assert _version(installed) >= floor, f"installed {installed} is below declared {declared[0]}"
