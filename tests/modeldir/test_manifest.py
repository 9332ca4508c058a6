"""modeldir: the one manifest contract of the bundle, the model dir and the runtime."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import modeldir
from modeldir import (
    FORMAT_VERSION,
    ManifestError,
    Task,
    check_manifest,
    parse_tasks,
    read_manifest,
    sha256_file,
    task_entries,
    verify_files,
)

REPO = Path(__file__).resolve().parents[2]
NAMES = ["news", "stars"]
CLASSES = [["World", "Sports"], ["1", "2", "3"]]


def manifest(**changes) -> dict:
    base = {
        "format_version": FORMAT_VERSION,
        "modality": "text",
        "tasks": task_entries(NAMES, CLASSES),
        "preprocessing": {"type": "text", "max_length": 16},
        "sha256": {"model.onnx": "ab" * 32},
    }
    return {**base, **changes}


def write_dir(root: Path, data: dict | str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (root / "manifest.json").write_text(text)
    return root


def test_task_entries_round_trip():
    entries = task_entries(NAMES, CLASSES)
    assert entries == [
        {"name": "news", "index": 0, "classes": ["World", "Sports"], "num_classes": 2},
        {"name": "stars", "index": 1, "classes": ["1", "2", "3"], "num_classes": 3},
    ]
    tasks = parse_tasks(json.loads(json.dumps(entries)), "m.json")
    assert tasks == (Task("news", 0, ("World", "Sports")), Task("stars", 1, ("1", "2", "3")))
    assert [t.num_classes for t in tasks] == [2, 3]
    assert check_manifest(manifest(), "m.json") == tasks


def test_task_entries_refuse_what_a_reader_would_refuse():
    with pytest.raises(ManifestError, match="duplicate task names"):
        task_entries(["a", "a"], [["x"], ["y"]])
    with pytest.raises(ManifestError, match=r"tasks\[0\].name"):
        task_entries(["*"], [["x"]])
    with pytest.raises(ManifestError, match="2 task names but 1 class lists"):
        task_entries(["a", "b"], [["x"]])


def _set_task(i, **values):
    def edit(m):
        m["tasks"][i].update(values)

    return edit


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
        (lambda m: m.update(format_version=True), "format_version True"),
        (lambda m: m.pop("format_version"), "format_version None"),
        (lambda m: m.update(modality="audio"), "modality 'audio'"),
        (lambda m: m.update(tasks=[]), "'tasks' must be a non-empty list"),
        (lambda m: m.update(tasks=["news"]), r"tasks\[0\] must be an object"),
        (_set_task(1, name="news"), r"duplicate task names \['news'\]"),
        (_set_task(1, name=""), r"tasks\[1\].name"),
        (_set_task(1, index=5), r"tasks\[1\].index is 5; it must be 1"),
        (_set_task(1, index=True), r"tasks\[1\].index is True"),
        (_set_task(0, num_classes=3), r"tasks\[0\].num_classes 3 != len\(tasks\[0\].classes\) 2"),
        (_set_task(0, classes=[]), r"tasks\[0\].classes"),
        (_set_task(0, classes=[1, 2]), r"tasks\[0\].classes"),
        (lambda m: m.update(preprocessing=None), "'preprocessing' must be an object"),
        (lambda m: m.update(preprocessing={"type": "image"}), "preprocessing.type 'image'"),
        (lambda m: m.pop("sha256"), "'sha256' must be an object"),
        (lambda m: m.update(sha256={"model.onnx": "abc"}), r"sha256\['model.onnx'\]"),
        (lambda m: m.update(sha256={"../x": "ab" * 32}), "'../x' is not a file name inside"),
        (lambda m: m.update(sha256={"/etc/x": "ab" * 32}), "'/etc/x' is not a file name inside"),
    ],
)
def test_each_bad_field_is_named_with_the_file(tmp_path, edit, field):
    data = manifest()
    edit(data)
    root = write_dir(tmp_path / "m", data)
    with pytest.raises(ManifestError, match=field) as err:
        read_manifest(root)
    message = str(err.value)
    assert message.startswith(f"{root / 'manifest.json'}: ") and "\n" not in message


def test_read_manifest_missing_directory_manifest_and_bad_json(tmp_path):
    with pytest.raises(ManifestError, match="bundle does not exist .*; run the trainer"):
        read_manifest(tmp_path / "nope", what="bundle", hint="run the trainer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="manifest.json: not found, so .* complete model dir"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(write_dir(tmp_path / "bad", "{"))
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        read_manifest(write_dir(tmp_path / "list", "[]"))
    assert read_manifest(write_dir(tmp_path / "good", manifest()))["modality"] == "text"


def test_verify_files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    digests = {"model.onnx": sha256_file(tmp_path / "model.onnx")}
    verify_files(tmp_path, digests, ["model.onnx"])
    verify_files(tmp_path, {"model.onnx": digests["model.onnx"].upper()}, ["model.onnx"])
    with pytest.raises(ManifestError, match="tokenizer.json: file not found .*; re-run export"):
        verify_files(tmp_path, digests, ["model.onnx", "tokenizer.json"], hint="re-run export")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="manifest.json: no sha256 for 'tokenizer.json'"):
        verify_files(tmp_path, digests, ["tokenizer.json"])
    (tmp_path / "model.onnx").write_bytes(b"graph, modified")
    with pytest.raises(ManifestError, match=r"model.onnx: sha256 mismatch \(manifest [0-9a-f]{12}"):
        verify_files(tmp_path, digests, ["model.onnx"])
    with pytest.raises(ManifestError, match="not a file name inside"):
        verify_files(tmp_path, digests, ["../model.onnx"])


def _py_files():
    # runs/ holds outputs and scratch copies of the tree (git-ignored), not the project
    skip = {".venv", "build", "dist", "node_modules", "__pycache__", "runs"}
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if not any(p in skip or p.startswith(".") for p in parts[:-1]):
            yield path


def test_format_version_is_defined_once_and_imported_by_all_three():
    definitions = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _py_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if re.match(r"\s*FORMAT_VERSION\s*(:[^=]*)?=(?!=)", line)
    ]
    assert len(definitions) == 1, definitions
    assert definitions[0].startswith("modeldir/manifest.py:"), definitions
    for user in ("trainer/results/bundle.py", "export/onnx.py", "runtime/manifest.py"):
        tree = ast.parse((REPO / user).read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "modeldir"
            for alias in node.names
        }
        assert "FORMAT_VERSION" in imported, f"{user} does not take FORMAT_VERSION from modeldir"
    assert modeldir.FORMAT_VERSION is modeldir.manifest.FORMAT_VERSION


def test_modeldir_imports_neither_torch_nor_numpy():
    code = (
        "import sys, modeldir, modeldir.files, modeldir.manifest\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
