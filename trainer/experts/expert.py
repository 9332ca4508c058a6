"""Where each task's expert comes from: the files its ``expert`` (or ``checkpoint``) names, the
cache, or fine-tuning here.

Experts given as files are all read and checked against the base (architecture, every tensor's
name and shape, pooling, head width, class count) by :func:`load_given_experts` BEFORE any
training, and the heads of all tasks must share one form (hidden layer or not, activation,
normalisation), since one stacked ``Heads`` serves them all.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import Backbone, BackboneSettings
from ..config import FinetuneConfig, TaskConfig
from ..data.tasks import TaskData, check_labels, resolve_path
from ..errors import UserError
from ..hub import resolve_source
from ..surgery.model import Heads, TaskHead
from .cache import cache_key, cached_training
from .checkpoints import StateDict
from .finetune import HEAD_SCALE, train_classifier
from .formats import ExpertSource, LoadedExpert, detect_format, load_expert
from .formats.registry import ZEROSHOT

log = logging.getLogger("deepsurgery")


@dataclass
class Expert:
    task: str
    state: StateDict  # backbone weights, same names and shapes as the base
    head: TaskHead
    source: str  # "checkpoint" | "cache" | "fine-tuned" | "<format> expert"
    normalize: bool = False  # its head reads the L2-normalised feature


def settle_backbone(
    settings: BackboneSettings, task_configs: list[TaskConfig], data_root: Path
) -> BackboneSettings:
    """The ``[backbone]`` settings with what the experts' own files fix filled in: a key the
    config leaves unset ("") takes the experts' value (logged once, with the file it came
    from); a key the config sets must agree with every expert, and the experts with each
    other, else a one-line error naming both sides. Read before the base is built."""
    keys = {f.name for f in dataclasses.fields(settings)}
    implied: dict[str, tuple[object, Path]] = {}  # key -> (value, the expert that says so)
    for cfg in task_configs:
        if not cfg.expert:
            continue
        where = f"task '{cfg.name}': expert"
        path = resolve_source(str(resolve_path(cfg.expert, data_root)), where)
        try:
            fmt = detect_format(path, cfg.name)
        except UserError:
            continue  # loading it says what is wrong, with the base at hand
        if fmt.implies is None:
            continue
        for key, value in fmt.implies(path, f"{where} {path}").items():
            if key not in keys:
                continue  # a setting this kind does not have: loading checks the kind
            configured = getattr(settings, key)
            if configured not in ("", None) and configured != value:
                raise UserError(
                    f"{where} {path} needs backbone.{key} = {value!r} ({fmt.name}: its head "
                    f"reads it) but the config sets {configured!r}; set [backbone] {key} = "
                    f'"{value}" or leave it out'
                )
            if key in implied and implied[key][0] != value:
                first, other = implied[key]
                raise UserError(
                    f"{where} {path} needs backbone.{key} = {value!r} but expert {other} needs "
                    f"{first!r}; one merged backbone has one {key}: give experts that agree"
                )
            implied.setdefault(key, (value, path))
    changes = {k: v for k, (v, _) in implied.items() if getattr(settings, k) in ("", None)}
    for key, value in changes.items():
        log.info(
            "backbone.%s = %r inferred from the expert %s (the config leaves it unset)",
            key,
            value,
            implied[key][1],
        )
    return dataclasses.replace(settings, **changes) if changes else settings


def load_given_experts(
    task_configs: list[TaskConfig],
    tasks: list[TaskData],
    base: Backbone,
    base_state: StateDict,
    data_root: Path,
    base_path: str = "",
) -> dict[str, LoadedExpert]:
    """Every task's ``expert`` / ``checkpoint``, read and checked; fills in the class names of
    tasks whose data names none from their expert. ``base_path``: the config's backbone.path
    (where a zero-shot head finds CLIP's text tower). -> {task name: loaded expert}."""
    configs = {t.name: t for t in task_configs}
    loaded = {}
    for task in tasks:
        cfg = configs.get(task.name)
        if cfg is None or not (cfg.expert or cfg.checkpoint):
            continue
        where = f"task '{task.name}': expert"
        if cfg.expert:
            path = resolve_source(str(resolve_path(cfg.expert, data_root)), where)
        else:
            path = resolve_path(cfg.checkpoint, data_root)
        head = cfg.head if cfg.head in ("", ZEROSHOT) else str(resolve_path(cfg.head, data_root))
        source = ExpertSource(path, task.name, task.classes, base, base_state, head, base_path)
        expert = load_expert(source, "" if cfg.expert else "deepsurgery")
        expert.state = {k: v.to(base_state[k].dtype) for k, v in expert.state.items()}
        if not task.classes:
            count = expert.head.num_classes
            task.classes = expert.classes or [str(i) for i in range(count)]
            check_labels(task, f"the expert {path}")
        loaded[task.name] = expert
    _check_head_forms(tasks, loaded, base)
    return loaded


def _head_form(expert: LoadedExpert | None, base: Backbone) -> tuple:
    """(hidden layer?, activation, normalised?) of a task's head; fine-tuned here: linear."""
    if expert is None:
        return (False, "", base.normalize_head)
    head = expert.head
    return (head.hidden_weight is not None, head.activation, expert.normalize)


def _describe(name: str, form: tuple, loaded: dict[str, LoadedExpert]) -> str:
    hidden, activation, normalize = form
    kind = f"a hidden layer ({activation}) before its classifier" if hidden else "a linear head"
    origin = "from its expert" if name in loaded else "fine-tuned here"
    return f"task '{name}' has {kind}{' on the normalised feature' if normalize else ''} ({origin})"


def _check_head_forms(
    tasks: list[TaskData], loaded: dict[str, LoadedExpert], base: Backbone
) -> None:
    """One stacked Heads serves every task: their heads must share one form."""
    forms = {t.name: _head_form(loaded.get(t.name), base) for t in tasks}
    first = tasks[0].name
    for name, form in forms.items():
        if form != forms[first]:
            raise UserError(
                f"{_describe(name, form, loaded)} but {_describe(first, forms[first], loaded)}; "
                "one multi-task model has one head form: give every task an expert of one kind"
            )


def get_expert(
    task: TaskData,
    *,
    given: LoadedExpert | None,
    base: Backbone,
    base_state: StateDict,
    finetune: FinetuneConfig,
    cache_dir: Path,
    device: torch.device,
) -> Expert:
    """The task's given expert, else from the cache, else by fine-tuning (then cached)."""
    if given is not None:
        source = "checkpoint" if given.format == "deepsurgery" else f"{given.format} expert"
        return Expert(task.name, given.state, given.head, source, given.normalize)
    if task.train is None or task.train.labels is None:
        raise UserError(
            f"task '{task.name}' has no labelled train split to fine-tune an expert on; give "
            "it one (train.jsonl, train/ class folders, x_train + y_train) or an expert"
        )
    settings = {**finetune.__dict__, "head_scale": HEAD_SCALE if base.normalize_head else None}
    key = cache_key("expert", base.spec(), base_state, [task.train_key], settings)
    trained = cached_training(
        "experts",
        task.name,
        key,
        cache_dir,
        base_state,
        lambda: train_classifier(
            base, [task], finetune, device, base.normalize_head, desc=f"fine-tune {task.name}"
        ),
    )
    ((weight, bias),) = trained.heads
    return Expert(
        task.name, trained.state, TaskHead(weight, bias), trained.source, base.normalize_head
    )


def expert_heads(experts: list[Expert]) -> Heads:
    """The experts' heads stacked into one ``Heads`` (their forms were checked to agree)."""
    return Heads.stack([e.head for e in experts], normalize=experts[0].normalize)
