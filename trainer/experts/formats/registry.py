"""The expert-format registry: every kind of fine-tuned checkpoint a task's ``expert`` may
point at is one small module that registers a detector (is this path mine? decided from the
files, cheaply) and a loader (-> the backbone weights in the BASE backbone's key layout, plus
the task's head: the expert's own classification path, which is never merged).

What every format shares lives here: reading safetensors and torch files with one-line errors,
the linear head file, the checks of a loaded expert against the base (architecture, tensor
names and shapes, pooling, head width, class count), and the matching of the expert's class
names to the task's (its head's rows reordered to the task's order), all before any training.

The head file (``head.safetensors``): a safetensors file with ``weight`` [C, F] and ``bias``
[C] (optional, zeros), and optional metadata ``classes`` (a JSON list of the C class names)
and ``normalize`` ("true" when the head reads the L2-normalised feature).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ...backbones import Backbone
from ...errors import UserError
from ...surgery.model import TaskHead
from ..checkpoints import StateDict, check_compatible
from .layout import HEAD_FILE, write_head_file  # noqa: F401  (re-exported: the formats' names)

log = logging.getLogger("deepsurgery")

ZEROSHOT = "zeroshot"  # a task's head = "zeroshot": built from its class names (CLIP)


@dataclass
class ExpertSource:
    """What a loader is given: the expert's local path and what it must fit."""

    path: Path  # a folder or a file, already fetched when it was a hub id
    task: str
    classes: list[str]  # the task's class names; [] when its data names none
    base: Backbone  # the configured base: its kind, key layout and settings
    base_state: StateDict
    head: str = ""  # the task's ``head``: "" (the expert's own), a head file, or "zeroshot"
    base_path: str = ""  # the config's backbone.path (a zero-shot head's text tower)

    @property
    def where(self) -> str:
        return f"task '{self.task}': expert {self.path}"


@dataclass
class LoadedExpert:
    state: StateDict  # backbone weights, the base's names and shapes
    head: TaskHead
    classes: list[str] | None = None  # class names the expert carries (id2label, head file)
    normalize: bool = False  # its head reads the L2-normalised feature
    pooling: str | None = None  # text: the pooling its head reads; None = the backbone's own
    format: str = ""


@dataclass(frozen=True)
class ExpertFormat:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[[ExpertSource], LoadedExpert]
    expects: str  # what such an expert looks like, for the "unknown format" error
    # the [backbone] settings the expert's own files fix, read cheaply before the base is built
    # (path, where) -> {key: value}, e.g. a *ForSequenceClassification head reads pooling "cls"
    implies: Callable[[Path, str], dict] | None = None


FORMATS: dict[str, ExpertFormat] = {}


def register(
    name: str,
    detect: Callable[[Path], bool],
    expects: str,
    implies: Callable[[Path, str], dict] | None = None,
):
    """Decorator: make ``load`` the loader of format ``name``, recognised by ``detect``;
    ``implies`` reads the backbone settings the expert's files fix."""

    def wrap(load: Callable[[ExpertSource], LoadedExpert]):
        if name in FORMATS:
            raise ValueError(f"expert format '{name}' is registered twice")
        FORMATS[name] = ExpertFormat(name, detect, load, expects, implies)
        return load

    return wrap


def detect_format(path: Path, task: str) -> ExpertFormat:
    """The one format whose detector recognises ``path``; else a one-line error listing what
    each format expects."""
    found = [f for f in FORMATS.values() if f.detect(path)]
    if not found:
        expected = "; ".join(f"{f.name}: {f.expects}" for f in FORMATS.values())
        raise UserError(f"task '{task}': expert {path} is in no known format; expected {expected}")
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise UserError(f"task '{task}': expert {path} looks like several formats ({names})")
    return found[0]


def load_expert(source: ExpertSource, format_name: str = "") -> LoadedExpert:
    """Detect (unless ``format_name`` is given), load, and check against the base."""
    fmt = FORMATS[format_name] if format_name else detect_format(source.path, source.task)
    loaded = fmt.load(source)
    loaded.format = fmt.name
    check_against_base(loaded, source)
    match_classes(loaded, source)
    return loaded


def check_against_base(loaded: LoadedExpert, source: ExpertSource) -> None:
    """Same tensors and shapes as the base (the first mismatch named), the pooling its head
    reads, a head as wide as the feature, as many classes as the task."""
    where = source.where
    check_compatible(source.base_state, loaded.state, where)
    pooling = getattr(source.base, "pooling", None)
    if loaded.pooling and loaded.pooling != pooling:
        raise UserError(
            f"{where}: its head reads the '{loaded.pooling}' pooling of the tokens but "
            f"backbone.pooling is '{pooling}'; set [backbone] pooling = \"{loaded.pooling}\""
        )
    head = loaded.head
    reads = head.hidden_weight if head.hidden_weight is not None else head.weight
    if reads.shape[-1] != source.base.feature_dim:
        raise UserError(
            f"{where}: its head reads {reads.shape[-1]} features, the base backbone gives "
            f"{source.base.feature_dim}"
        )
    if loaded.classes is not None and len(loaded.classes) != head.num_classes:
        raise UserError(
            f"{where}: names {len(loaded.classes)} classes but its head has {head.num_classes}"
        )
    if source.classes and head.num_classes != len(source.classes):
        raise UserError(
            f"{where}: its head has {head.num_classes} classes, task '{source.task}' has "
            f"{len(source.classes)} ({', '.join(source.classes[:4])}"
            f"{', ...' if len(source.classes) > 4 else ''}); point the task at its own expert"
        )


# ---- class names ---------------------------------------------------------------------------

# transformers names the classes of a config made without id2label LABEL_0, LABEL_1, ...
GENERIC_NAME = re.compile(r"label_(\d+)")
LISTED = 20  # class names an error line lists per side before "..."


def class_key(name: str) -> str:
    """How two class names are compared: Unicode NFKC, case-folded, ``_`` and ``-`` read as
    spaces, runs of whitespace collapsed, ends stripped. So "Sci/Tech" is "sci/tech" and
    "annual_crop" is "Annual Crop", while "sci" and "science" stay different: names that only
    spelling conventions separate match, nothing is guessed."""
    text = unicodedata.normalize("NFKC", name).casefold().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def is_generic(names: Sequence[str]) -> bool:
    """``LABEL_0``, ``LABEL_1``, ... in index order: names that say nothing of the classes."""
    return all(
        (m := GENERIC_NAME.fullmatch(class_key(n).replace(" ", "_"))) and int(m[1]) == i
        for i, n in enumerate(names)
    )


def _keys(names: Sequence[str]) -> list[str] | None:
    """The names as compared: normalised (``class_key``), or merely stripped where the
    normalisation would make two of them one; None when even those repeat."""
    for key in (class_key, str.strip):
        keys = [key(n) for n in names]
        if len(set(keys)) == len(keys):
            return keys
    return None


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > LISTED else shown


def class_order(expert: Sequence[str], task: Sequence[str], where: str, name: str) -> list[int]:
    """For each of the task's classes, the index of the expert's class of that name (equal
    under ``class_key``); a one-line error listing both when the names are not one set."""
    keys, wanted = _keys(expert), _keys(task)
    for names, got, whose in ((expert, keys, "the expert"), (task, wanted, f"task '{name}'")):
        if got is None:
            twice = next(n for i, n in enumerate(names) if n.strip() in map(str.strip, names[:i]))
            raise UserError(
                f"{where}: {whose} names class '{twice}' twice; give every class its own name"
            )
    index = {k: i for i, k in enumerate(keys)}
    if set(index) != set(wanted):
        unmatched = [n for n, k in zip(expert, keys) if k not in set(wanted)]
        raise UserError(
            f"{where}: its classes ({_listed(expert)}) are not those of task '{name}' "
            f"({_listed(task)}): '{unmatched[0]}' is not among them; rename the classes of one "
            "side (the task's labels.json / classes, or the expert's id2label / head file) so "
            "that the same names mean the same classes"
        )
    return [index[k] for k in wanted]


def match_classes(loaded: LoadedExpert, source: ExpertSource) -> None:
    """Make the expert's head answer in the task's class order: its classes are matched to
    the task's by name (``class_key``) and the head's output rows (weight and bias) reordered
    so that row i is the task's class i. Logged once when anything is assumed or reordered:
    generic names (``LABEL_i``) and an expert that names no classes are taken in index order.
    Names that are not the task's are refused (``class_order``). A task whose data names no
    classes takes the expert's names as they are."""
    if not source.classes:
        return
    expert, task = loaded.classes, list(source.classes)
    if expert is None:
        log.info(
            "%s names no classes: its head's %d outputs are taken as the task's classes in "
            "order (%s)",
            source.where,
            len(task),
            _listed(task),
        )
        return
    if is_generic(expert) or is_generic(task):
        if expert != task:
            whose, names = ("its", expert) if is_generic(expert) else ("the task's", task)
            log.info(
                "%s: %s class names %s are generic; its outputs are taken in index order as "
                "the task's classes (%s)",
                source.where,
                whose,
                _listed(names),
                _listed(task),
            )
        loaded.classes = task
        return
    order = class_order(expert, task, source.where, source.task)
    if order != list(range(len(order))):
        head = loaded.head
        head.weight, head.bias = head.weight[order].clone(), head.bias[order].clone()
        log.info(
            "%s lists the task's classes in another order (%s); its head's rows are "
            "reordered to the task's (%s)",
            source.where,
            _listed(expert),
            _listed(task),
        )
    loaded.classes = task


# ---- reading files -------------------------------------------------------------------------


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names of a safetensors file (its header only: cheap, for detectors)."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a broken header
        raise UserError(
            f"{what} {path} is not a readable safetensors file ({_first_line(exc)}); "
            "re-save it or point at the right file"
        ) from None


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a corrupt one is a one-line error."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise UserError(
            f"{what} {path} is not a readable safetensors file ({_first_line(exc)}); "
            "re-save it or point at the right file"
        ) from None


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file (``{"state_dict": ...}`` unwrapped)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{what} {path} cannot be read as a torch state dict ({_first_line(exc)}); a whole "
            "model saved with torch.save(model) is refused: save model.state_dict() instead"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} {path} does not hold a state dict (names -> tensors)")
    return state


# ---- the head file -------------------------------------------------------------------------


def read_head_file(path: Path, what: str) -> tuple[TaskHead, list[str] | None, bool | None]:
    """-> (the linear head, its class names or None, its ``normalize`` flag or None)."""
    if not path.is_file():
        raise UserError(
            f"{what}: head file {path} not found (expected a safetensors file with weight "
            "[C, F] and bias [C])"
        )
    tensors, meta = read_safetensors(path, f"{what}: head file")
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2:
        raise UserError(f"{what}: head file {path} has no 'weight' tensor of shape [C, F]")
    bias = tensors.get("bias", torch.zeros(weight.shape[0]))
    if tuple(bias.shape) != (weight.shape[0],):
        raise UserError(
            f"{what}: head file {path} has bias of shape {list(bias.shape)}, expected "
            f"[{weight.shape[0]}] (one per row of weight)"
        )
    classes = None
    if "classes" in meta:
        try:
            classes = json.loads(meta["classes"])
        except json.JSONDecodeError:
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{what}: head file {path}: metadata 'classes' is not a JSON list")
    normalize = None
    if "normalize" in meta:
        normalize = meta["normalize"].strip().lower() == "true"
    return TaskHead(weight.float(), bias.float()), classes, normalize


def linear_head(
    source: ExpertSource, default: Path | None, normalize: bool
) -> tuple[TaskHead, list[str] | None, bool]:
    """The task's head file (or ``default``): (head, class names, normalize), the file's
    ``normalize`` metadata overriding the format's convention ``normalize``."""
    head, classes, flag = read_head_file(head_path(source, default), source.where)
    return head, classes, normalize if flag is None else flag


def head_path(source: ExpertSource, default: Path | None) -> Path:
    """The task's ``head`` file when set, else ``default`` (a head file inside the expert)."""
    if source.head:
        return Path(source.head).expanduser()
    if default is not None and default.is_file():
        return default
    raise UserError(
        f"{source.where} carries no classification head: put {HEAD_FILE} (safetensors with "
        'weight [C, F] and bias [C]) beside it, or set the task\'s head = "FILE"'
        + (' or head = "zeroshot"' if source.base.normalize_head else "")
    )
