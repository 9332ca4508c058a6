"""Model versions and hot-swap: `--model` may be one model dir or a directory of versions.

    models/            # --model models
      1/  manifest.json model.onnx tokenizer.json
      2/  ...
      3/  ...          # the newest VALID version is served

A version is a model dir (as `python -m export.onnx` writes it) named by a positive integer.
Loading one means: the manifest contract and the sha256 of every file (runtime.manifest), the
export's parity record when the manifest has one, onnxruntime loading the graph, and a probe
run of one row per task through it (finite logits of the right shape). Only then is it swapped
in; a version that fails any step is refused with one log line and the served one stays.

`VersionManager.reload()` is what SIGHUP and `--watch` call: it looks for the newest valid
version and returns its loaded model when that differs from the served one (a new number, or
the served dir's files changed); a refused version is not retried until its files change.
Deleting the newest version and reloading rolls back to the one below it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeldir import parity_failure
from runtime.manifest import ModelDirError

log = logging.getLogger("runtime.versions")

VERSION_NAME = re.compile(r"^[1-9][0-9]*$")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Candidate:
    version: int | None  # None: `--model` is itself a model dir
    path: Path


def is_versions_dir(root: Path) -> bool:
    return root.is_dir() and not (root / MANIFEST).exists()


def candidates(root: Path) -> list[Candidate]:
    """The model dirs under `root`, newest first; `root` itself when it is a model dir."""
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"{root}: not a directory; pass --model DIR written by export.onnx")
    if (root / MANIFEST).exists():
        return [Candidate(None, root)]
    found = [
        Candidate(int(p.name), p)
        for p in root.iterdir()
        if p.is_dir() and VERSION_NAME.match(p.name)
    ]
    if not found:
        raise ModelDirError(
            f"{root}: neither a model dir (no {MANIFEST}) nor a directory of numbered versions "
            "(1/, 2/, ...); pass --model DIR written by export.onnx"
        )
    return sorted(found, key=lambda c: c.version, reverse=True)


def fingerprint(path: Path) -> tuple:
    """Names, sizes and mtimes of a dir's files: changes when a version is rewritten."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return tuple(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()
        )
    except OSError:
        return ()


def check_parity_record(manifest: dict, where: Path) -> None:
    """Refuse a manifest whose recorded export parity fails the export's bar for its precision
    (modeldir.PARITY_BARS: export refuses to write worse, so such a dir was not written by a
    passing export)."""
    why = parity_failure(manifest.get("parity") or {}, manifest.get("precision", "fp32"))
    if why is not None:
        raise ModelDirError(f"{where}: {why}; re-export")


def probe(model) -> None:
    """One row per task through the loaded graph: raises ModelDirError unless every task's
    logits come back finite and of its number of classes."""
    spec = model.spec
    if spec.modality == "text":
        row = model.pre.text("probe")
    else:
        size = spec.preprocessing.get("image_size", [224, 224])
        row = np.zeros((3, *size), np.float32)
    indices = list(range(len(spec.tasks)))
    try:  # a `*` request: one input, one row per task
        logits = model.engine.run([row], indices, [0] * len(indices))
    except Exception as e:
        raise ModelDirError(f"{spec.root}: probe run failed ({type(e).__name__}: {e})") from None
    for t, out in zip(spec.tasks, logits, strict=True):
        if out.shape != (t.num_classes,) or not np.all(np.isfinite(out)):
            raise ModelDirError(
                f"{spec.root}: probe run gave task {t.name!r} logits of shape {out.shape} "
                f"(finite: {bool(np.all(np.isfinite(out)))}); want ({t.num_classes},) finite"
            )


Loader = Callable[[Path, int | None], object]  # (dir, version) -> InferenceModel


class VersionManager:
    """Which version is served, and loading the next one.

    `load(path, version)` builds an InferenceModel (raising ModelDirError/EngineError/...
    for a bad dir); the manager adds the parity and probe checks around it."""

    def __init__(self, root: Path, load: Loader):
        self.root = Path(root)
        self.load = load
        self.current: Candidate | None = None
        self._current_print: tuple = ()
        self._refused: dict[Path, tuple] = {}
        self._listing: tuple = ()
        self.loaded = 0
        self.refused = 0

    @property
    def versioned(self) -> bool:
        return is_versions_dir(self.root)

    def _try(self, cand: Candidate):
        model = self.load(cand.path, cand.version)
        check_parity_record(model.spec.manifest, cand.path / MANIFEST)
        probe(model)
        return model

    def _refuse(self, cand: Candidate, error: Exception, keeping: str) -> None:
        self.refused += 1
        self._refused[cand.path] = fingerprint(cand.path)
        what = "model dir" if cand.version is None else f"model version {cand.version}"
        log.error("%s refused: %s; %s", what, " ".join(str(error).split()), keeping)

    def adopt(self, model, cand: Candidate) -> None:
        self.current = cand
        self._current_print = fingerprint(cand.path)
        self._listing = self.listing()

    def initial(self):
        """Load the newest valid version (older ones when newer are broken); raises the
        newest's error when none loads."""
        first_error = None
        for cand in candidates(self.root):
            try:
                model = self._try(cand)
            except (ModelDirError, ValueError, RuntimeError, OSError) as e:
                first_error = first_error or e
                if cand.version is None:
                    raise
                self._refuse(cand, e, "trying the version below")
                continue
            self.adopt(model, cand)
            self.loaded += 1
            return model
        newest = candidates(self.root)[0]
        raise ModelDirError(
            f"{self.root}: no version loads (newest, {newest.version}: {first_error})"
        )

    def listing(self) -> tuple:
        """A cheap signature of what is on disk: version dirs and their files."""
        try:
            cands = candidates(self.root)
        except ModelDirError:
            return ()
        return tuple((c.path.name, fingerprint(c.path)) for c in cands)

    def changed(self) -> bool:
        """True when the versions on disk differ from the last look (for --watch polling)."""
        now = self.listing()
        if now == self._listing:
            return False
        self._listing = now
        return True

    def reload(self):
        """(model, candidate) of the newest valid version when it is not the one served, else
        None. Refusals are logged; the served model is untouched either way."""
        keeping = "still serving " + (
            "the current model" if self.current is None else self._name(self.current)
        )
        try:
            cands = candidates(self.root)
        except ModelDirError as e:
            log.error("reload refused: %s; %s", e, keeping)
            self.refused += 1
            return None
        for cand in cands:
            if cand == self.current and fingerprint(cand.path) == self._current_print:
                return None  # nothing newer loads: keep serving
            if self._refused.get(cand.path) == fingerprint(cand.path):
                continue  # refused before and unchanged since
            try:
                model = self._try(cand)
            except Exception as e:  # whatever a broken dir raises, the old model keeps serving
                self._refuse(cand, e, keeping)
                continue
            self._refused.pop(cand.path, None)
            self.adopt(model, cand)
            self.loaded += 1
            return model, cand
        return None

    @staticmethod
    def _name(cand: Candidate) -> str:
        return str(cand.path) if cand.version is None else f"version {cand.version}"
