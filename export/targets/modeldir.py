"""``--target modeldir`` (the default): the model directory ``runtime.server`` reads —
``model.onnx``, ``manifest.json``, the per-task graphs and ``tokenizer.json`` for text."""

from __future__ import annotations

import shutil
from pathlib import Path

from modeldir import MANIFEST, atomic_directory, write_json_atomic

from .registry import VerifiedExport, register


@register("modeldir", help="the model directory runtime.server serves (default)")
def write(verified: VerifiedExport, out: Path) -> Path:
    """The verified files as they are, and the manifest beside them."""
    with atomic_directory(out) as tmp:
        for name in verified.files:
            shutil.move(verified.staging / name, tmp / name)
        write_json_atomic(tmp / MANIFEST, verified.manifest)
    return out / verified.files[0]
