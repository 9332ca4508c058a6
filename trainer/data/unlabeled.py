"""The unlabeled pool: the inputs surgery and data-driven merging (AdaMerging) learn from.

Labels never reach the pool. Two protocols, named in every log line, results.json and the
bundle manifest:

- **inductive** (the default, ``surgery.unlabeled = "train"``): each task's train inputs with
  their labels dropped, minus its validation rows (already held out of the train split), and
  minus every input whose content equals a scored test input or a validation input (sha256 of
  the text's utf-8 / the image array's bytes: real datasets repeat some rows across splits).
  What is scored was never seen, and what the bundle row is chosen on was not learned from
  either (a task without validation rows has the inputs its agreement score is computed on
  taken out of its pool: ``data.validation.carve_unlabeled_validation``). A user pool
  (``task:<name>``, a file or folder) is inductive too, and refused when it shares inputs
  with a scored test split; so is a task's own pool (``[[tasks]] unlabeled``: a file or
  folder of that task's inputs, e.g. its deployment traffic), which replaces the shared
  source's for that task.
- **transductive** (``surgery.unlabeled = "test"``): each task's own test inputs, the paper's
  protocol (arXiv 2410.14389): the adapters learn from the very inputs they are scored on.

``surgery.unlabeled_size`` caps each task's pool (a seeded random choice): ``"auto"`` gives a
train pool as many rows as the task's test split, so the experts' stored representations
(``surgery.features.Targets``: [N, L, D] + [N, F] float32 per task) and their one-off
computation cost what the transductive protocol costs; ``"all"`` keeps every row; a number
caps every pool at that many rows. ``surgery.unlabeled_fraction`` then keeps a seeded part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import UserError
from .tasks import IMAGE_SUFFIXES, TaskData, read_image, resolve_path
from .validation import carve_unlabeled_validation

log = logging.getLogger("deepsurgery")

PROTOCOLS = {"train": "inductive", "test": "transductive"}
TRANSDUCTIVE_FIX = 'set surgery.unlabeled = "test" for the transductive protocol'


@dataclass
class UnlabeledPool:
    """Per task, the inputs surgery and AdaMerging learn from, and where they come from."""

    pools: list[list]  # per task: inputs only (texts, or uint8 images [H, W, 3])
    protocol: str  # "inductive" | "transductive"
    source: str  # the config's value: "train", "test", "task:<name>" or the path
    origins: list[str]  # per task: "train" | "test" | "inputs" (a task's unscored inputs) | source
    overlap_with_test: int  # pool inputs equal to a scored test input (0 when inductive)
    dropped: list[int]  # per task: train inputs dropped as copies of test / validation inputs

    def record(self, names: list[str]) -> dict:
        """results.json's ``unlabeled`` (and, without ``rows``' detail, the manifest's)."""
        return {
            "protocol": self.protocol,
            "source": self.source,
            "rows": {n: len(p) for n, p in zip(names, self.pools)},
            "overlap_with_test": self.overlap_with_test,
            "origin": dict(zip(names, self.origins)),
            "dropped_duplicates": dict(zip(names, self.dropped)),
        }

    def describe(self) -> str:
        """``inductive (train inputs)``: how log lines and the summary name the pool."""
        what = {
            "train": "train inputs",
            "test": "test inputs",
        }.get(self.source, self.source if self.source.startswith("task:") else "given inputs")
        own = [o for o in self.origins if o not in ("train", "test", "inputs", self.source)]
        mine = (
            ""
            if not own
            else "; 1 task's own pool"
            if len(own) == 1
            else f"; {len(own)} tasks' own pools"
        )
        return f"{self.protocol} ({what}{mine})"


def content_hash(item) -> bytes:
    """sha256 of a text's utf-8 or of an image array's bytes (with its shape and dtype)."""
    if isinstance(item, str):
        return hashlib.sha256(item.encode("utf-8")).digest()
    array = np.ascontiguousarray(item)
    head = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).digest()


def _hashes(inputs) -> list[bytes]:
    return [content_hash(x) for x in inputs]


def protocol_of(source: str) -> str:
    """The protocol a ``surgery.unlabeled`` value runs: only ``test`` is transductive."""
    return PROTOCOLS.get(source, "inductive")


def unlabeled_pool(config: Config, tasks: list[TaskData], data_root: Path) -> UnlabeledPool:
    """Every task's pool for ``surgery.unlabeled`` (see the module docstring), checked: an
    inductive pool sharing inputs with a scored test split, or a pool left empty, is refused
    with a one-line error before any work."""
    sc = config.surgery
    source, protocol = sc.unlabeled, protocol_of(sc.unlabeled)
    scored = {h for t in tasks if t.labelled for h in _hashes(t.test.inputs)}
    dropped = [0] * len(tasks)
    if source == "train":
        validation = {
            h for t in tasks if t.validation is not None for h in _hashes(t.validation.inputs)
        }
        pools, origins = [], []
        for i, task in enumerate(tasks):
            pool, origin = _train_inputs(task)
            keep = [
                j for j, h in enumerate(_hashes(pool)) if h not in scored and h not in validation
            ]
            dropped[i] = len(pool) - len(keep)
            if not keep:
                raise UserError(
                    f"task '{task.name}': no usable unlabeled inputs for the inductive pool: all "
                    f"{len(pool)} of its {origin} inputs equal test or validation inputs; add "
                    f"other inputs, give a pool file (surgery.unlabeled = PATH), or "
                    f"{TRANSDUCTIVE_FIX}"
                )
            pools.append([pool[j] for j in keep])
            origins.append(origin)
        if any(dropped):
            log.info(
                "inductive pool: dropped %d train inputs equal to test or validation inputs (%s)",
                sum(dropped),
                ", ".join(f"{t.name} {n}" for t, n in zip(tasks, dropped) if n),
            )
    elif source == "test":
        pools, origins = [list(t.test.inputs) for t in tasks], ["test"] * len(tasks)
    else:
        shared = _user_pool(source, tasks, data_root)
        pools, origins = [shared] * len(tasks), [source] * len(tasks)
    own = {t.name: t.unlabeled for t in config.tasks if t.unlabeled}  # [[tasks]] unlabeled
    pools, origins = _own_pools(own, tasks, pools, origins, protocol, data_root, scored)
    overlap = sum(h in scored for pool in _distinct(pools) for h in _hashes(pool))
    if protocol == "inductive" and overlap:
        raise UserError(
            f"surgery.unlabeled '{source}' shares {overlap} inputs with the scored test splits, "
            f"so the inductive protocol would score inputs surgery learned from; remove them "
            f"from the pool, or {TRANSDUCTIVE_FIX}"
        )
    if protocol == "inductive":  # what a task without validation rows is scored on: not pool
        pools = [
            pool if task.validation is not None else carve_unlabeled_validation(config, task, pool)
            for pool, task in zip(pools, tasks)
        ]
    # a task's own pool is a given pool: "auto" keeps it all
    pools = [
        _subset(
            pool,
            _cap(sc.unlabeled_size, "own" if task.name in own else source, task),
            sc.seed,
            task.name,
        )
        for pool, task in zip(pools, tasks)
    ]
    return UnlabeledPool(
        _fraction(pools, sc.unlabeled_fraction, sc.seed),
        protocol,
        source,
        origins,
        overlap,
        dropped,
    )


def _train_inputs(task: TaskData) -> tuple[list, str]:
    """A task's inductive inputs: its train split (the validation rows are already out), or,
    for a task without one whose inputs are unlabeled (nothing of it is scored), those."""
    if task.train is not None and len(task.train):
        return list(task.train.inputs), "train"
    if not task.labelled:
        return list(task.test.inputs), "inputs"
    raise UserError(
        f"task '{task.name}' has no train split for the inductive pool (surgery.unlabeled = "
        f'"train") and its test inputs are scored; give it train inputs or a pool file '
        f"(surgery.unlabeled = PATH), or {TRANSDUCTIVE_FIX}"
    )


def _user_pool(source: str, tasks: list[TaskData], data_root: Path) -> list:
    """``task:<name>`` (that task's test inputs, for every task) or a file / folder."""
    if source.startswith("task:"):
        name = source[5:]
        match = [t for t in tasks if t.name == name]
        if not match:
            raise UserError(
                f"surgery.unlabeled '{source}': no task named '{name}'; tasks: "
                f"{', '.join(t.name for t in tasks)}"
            )
        return list(match[0].test.inputs)
    return read_wild(resolve_path(source, data_root))


def _own_pools(
    own: dict[str, str],
    tasks: list[TaskData],
    pools: list[list],
    origins: list[str],
    protocol: str,
    data_root: Path,
    scored: set[bytes],
) -> tuple[list[list], list[str]]:
    """Each task's own pool (``own``: task name -> its ``[[tasks]] unlabeled``) in place of
    the shared source's; one that shares inputs with a scored test split is refused."""
    if not own:
        return pools, origins
    if protocol == "transductive":
        raise UserError(
            f"tasks {', '.join(sorted(own))} give their own unlabeled pool (inductive) while "
            f'surgery.unlabeled = "test" (transductive): drop one of the two'
        )
    pools, origins = list(pools), list(origins)
    for i, task in enumerate(tasks):
        if task.name in own:
            pools[i] = read_wild(resolve_path(own[task.name], data_root), task.name)
            origins[i] = own[task.name]
            shared = sum(h in scored for h in _hashes(pools[i]))
            if shared:
                raise UserError(
                    f"task '{task.name}': its unlabeled pool {own[task.name]} shares {shared} "
                    f"inputs with the scored test splits, so the inductive protocol would score "
                    f"inputs surgery learned from; remove them from the pool"
                )
    return pools, origins


def _distinct(pools: list[list]) -> list[list]:
    """The pools with a pool shared by every task counted once."""
    out: list[list] = []
    for pool in pools:
        if not any(pool is seen for seen in out):
            out.append(pool)
    return out


def _cap(size, source: str, task: TaskData) -> int | None:
    """The most rows ``surgery.unlabeled_size`` allows task ``task``'s pool (None: no cap)."""
    if size == "all":
        return None
    if size == "auto":
        return len(task.test) if source == "train" else None
    return int(size)


def _subset(pool: list, cap: int | None, seed: int, name: str) -> list:
    """At most ``cap`` rows of ``pool``: a seeded random choice, kept in pool order."""
    if cap is None or len(pool) <= cap:
        return pool
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 3])
    return [pool[i] for i in np.sort(rng.choice(len(pool), size=cap, replace=False))]


def _fraction(pools: list[list], fraction: float, seed: int) -> list[list]:
    """``surgery.unlabeled_fraction`` of every pool (seeded, at least one row)."""
    rng = np.random.default_rng(seed)
    out = []
    for pool in pools:
        keep = max(1, int(round(len(pool) * fraction)))
        rows = (
            np.sort(rng.choice(len(pool), size=keep, replace=False))
            if keep < len(pool)
            else np.arange(len(pool))
        )
        out.append([pool[i] for i in rows])
    return out


def read_wild(path: Path, task: str = "") -> list:
    """Unlabeled inputs from a file or folder; labels, if the file has any, are ignored.
    ``task``: the task whose own pool this is (``[[tasks]] unlabeled``), for the errors."""
    setting = f"task '{task}': unlabeled" if task else "surgery.unlabeled"
    if not path.exists():
        expected = (
            "a text/jsonl file, an .npz, or a folder of inputs"
            if task
            else "'train', 'test', 'task:<name>', a text/jsonl file, an .npz, or a folder of inputs"
        )
        raise UserError(f"{setting}: {path} does not exist (expected {expected})")
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            key = "x_test" if "x_test" in z else "x_train"
            items = list(z[key])
    elif path.is_file():
        items = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                items.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line)
    elif (path / "test.jsonl").is_file():
        items = [
            json.loads(x)["text"]
            for x in (path / "test.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
    else:
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        items = [read_image(f) for f in files]
    if not items:
        raise UserError(f"{setting}: {path} holds no inputs (texts or images)")
    return items
